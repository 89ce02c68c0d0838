"""The OpenSSH transport (``ssh_transport=openssh``): a supervised ``ssh -N -M`` per bastion.

Why: OpenSSH relays forwarded connections in C, with none of the per-packet
Python work (and thread hand-offs) of the paramiko relay (issue 14). The
TunnelSupervisor contract stays the same; only the strategy differs:

- **Session**: one ``ssh -N -M -S <control socket>`` child process per bastion
  (a ControlMaster; ``-F /dev/null``: no user config), started in its own
  process group, watched with ``poll()``. OpenSSH's ``ServerAliveInterval`` /
  ``ServerAliveCountMax`` stand in for our Heartbeat: a bastion that stops
  answering ends the process, and the supervisor restarts it under its policy.
- **Forwards**: added with ``ssh -S <socket> -O forward -L 127.0.0.1:port:host:port``
  and removed with ``-O cancel``; a restarted master gets every current forward
  on its command line, on the same local ports (``ExitOnForwardFailure``).
- **Host keys**: the policy becomes a known_hosts file of the session's own
  (``UserKnownHostsFile``, ``StrictHostKeyChecking``): the keys the spec's
  ``host_key`` or the shared ``ssh_known_hosts_file`` list for this bastion
  (``strict`` and a known bastion: ``yes``), ``@revoked`` lines always;
  pin-first with an unknown bastion uses ``accept-new`` and pins the key ssh
  recorded after authentication, through :func:`~enginehouse.actors.host_keys.pin_host_key`.
- **Secrets** never go on a command line (``ps`` shows argv) nor in a log: the
  private key is written decrypted to a 0600 file in a 0700 temporary folder,
  a password goes to a 0600 file read by an ``SSH_ASKPASS`` helper; both are
  removed as soon as the master is up (or failed).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from enginehouse import forking
from enginehouse.actors.host_keys import (
    decide_host_keys,
    parse_line,
    pin_host_key,
    pin_name,
    verify_host_key,
)
from enginehouse.actors.ssh import load_private_key
from enginehouse.actors.ssh_transport import (
    Forward,
    OpenerFactory,
    Session,
    SSHTransport,
    TransportSettings,
)
from enginehouse.errors import TunnelError
from enginehouse.specs import SSHTunnelSpec

log = logging.getLogger("enginehouse.tunnel")

_POLL = 0.01  # s between looks at the control socket while the master starts
_STOP_TIMEOUT = 5.0
_REASON_LIMIT = 300


def ssh_binary() -> str:
    """The ``ssh`` client on PATH, or a TunnelError saying the transport needs it."""
    found = shutil.which("ssh")
    if found is None:
        raise TunnelError("ssh_transport openssh needs the OpenSSH client (ssh) on PATH")
    return found


# -- secrets -------------------------------------------------------------------------


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def plain_private_key(spec: SSHTunnelSpec) -> bytes | None:
    """The spec's private key, decrypted, in OpenSSH format (ssh must not ask for a passphrase).

    Validated first by paramiko's reader, so a bad key or passphrase raises the same
    :class:`~enginehouse.errors.InvalidSpecError` as with the paramiko transport.
    """
    if spec.private_key is None:
        return None
    load_private_key(spec)
    text = spec.private_key.get_secret_value().encode()
    phrase = spec.private_key_password
    password = None if phrase is None else phrase.get_secret_value().encode()
    key: Any
    try:
        key = _load_key(text, password)
    except TypeError:  # a passphrase given for a key that has none
        key = _load_key(text, None)
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )


def _load_key(text: bytes, password: bytes | None) -> Any:
    if b"OPENSSH PRIVATE KEY" in text:
        return serialization.load_ssh_private_key(text, password)
    return serialization.load_pem_private_key(text, password)


def _short_temp_dir() -> str | None:
    """Where the folder goes: a control socket's path must fit in 104 bytes (``sun_path``).

    macOS's per-user ``$TMPDIR`` is long; ``/tmp`` then (the folder itself is 0700).
    """
    default = tempfile.gettempdir()
    if len(default) > 60 and os.path.isdir("/tmp"):
        return "/tmp"
    return None


class SecretFiles:
    """A 0700 temporary folder: the session's control socket, known_hosts, log and secrets."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="enginehouse-ssh-", dir=_short_temp_dir()))
        self.control = self.dir / "control"
        self.known_hosts = self.dir / "known_hosts"
        self.log = self.dir / "ssh.log"
        self._secrets: list[Path] = []

    def key(self, data: bytes) -> Path:
        path = self.dir / "identity"
        _write_private(path, data)
        self._secrets.append(path)
        return path

    def askpass(self, password: str) -> Path:
        """An ``SSH_ASKPASS`` helper printing the password from a 0600 file (not argv, not env)."""
        secret = self.dir / "password"
        _write_private(secret, password.encode())
        helper = self.dir / "askpass"
        _write_private(helper, f"#!/bin/sh\nexec cat '{secret}'\n".encode(), 0o700)
        self._secrets += [secret, helper]
        return helper

    def remove_secrets(self) -> None:
        for path in self._secrets:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._secrets.clear()

    def remove(self) -> None:
        self.remove_secrets()
        shutil.rmtree(self.dir, ignore_errors=True)

    def reason(self) -> str:
        """The last lines ssh wrote (it never writes a secret), for an error message."""
        try:
            lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines()]
        except OSError:
            return ""
        lines = [line for line in lines if line and not line.startswith("Warning: Permanently")]
        return "; ".join(lines[-3:])[-_REASON_LIMIT:]


# -- host keys -----------------------------------------------------------------------


class HostKeyPlan:
    """The host-key policy as OpenSSH options and a known_hosts file of the session's own."""

    def __init__(
        self, strict: str, lines: list[str], *, check_after: bool, mismatch: str = ""
    ) -> None:
        self.strict = strict  # StrictHostKeyChecking
        self.lines = lines
        self.check_after = check_after  # verify (and pin) the key ssh recorded, once authenticated
        self.mismatch = mismatch  # what to say when ssh refuses the key it was shown

    @classmethod
    def for_spec(cls, spec: SSHTunnelSpec, known_hosts: Path | None) -> HostKeyPlan:
        """:func:`~enginehouse.actors.host_keys.decide_host_keys`'s decision, mapped to OpenSSH."""
        decided = decide_host_keys(spec, known_hosts)
        name = pin_name(spec)
        revoked = [f"@revoked {name} {k.get_name()} {k.get_base64()}" for k in decided.revoked]
        if decided.mode == "accept":
            return cls("no", revoked, check_after=True)  # verify_host_key warns when unverified
        if decided.mode == "listed":
            accepted = [
                f"{name} {key.get_name()} {key.get_base64()}" for key in decided.expected.accepted
            ]
            mismatch = decided.mismatch(spec, known_hosts, None)
            return cls("yes", revoked + accepted, check_after=False, mismatch=mismatch)
        if decided.mode == "refuse":
            raise TunnelError(decided.refusal)
        return cls("accept-new", revoked, check_after=True)

    def options(self, files: SecretFiles) -> list[str]:
        files.known_hosts.write_text("".join(f"{line}\n" for line in self.lines))
        return [
            f"StrictHostKeyChecking={self.strict}",
            f"UserKnownHostsFile={files.known_hosts}",
            "GlobalKnownHostsFile=/dev/null",
            "CheckHostIP=no",
            "HashKnownHosts=no",
            "UpdateHostKeys=no",
        ]

    def recorded_key(self, files: SecretFiles) -> Any:
        """The key ssh added to the session's known_hosts (accept-new / no), or None."""
        with contextlib.suppress(OSError):
            for raw in files.known_hosts.read_text().splitlines():
                line = parse_line(raw)
                if line is not None and line.marker is None:
                    return line.key
        return None


# -- the master process --------------------------------------------------------------


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _forward_arg(local_port: int, host: str, port: int) -> str:
    return f"127.0.0.1:{local_port}:{_target(host, port)}"


class OpenSSHMaster:
    """One running ``ssh -N -M`` (a :data:`~enginehouse.actors.ssh_transport.Session`)."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        files: SecretFiles,
        bastion: str,
        on_death: Callable[[], None] | None = None,
    ) -> None:
        self.process = process
        self.files = files
        self.bastion = bastion
        self._pid = os.getpid()
        self._closing = False
        self.up = False  # set once authenticated: only a master that was up reports its death
        self._on_death = on_death
        forking.track(self)
        self._watcher = threading.Thread(
            target=self._watch, name=f"enginehouse-openssh-{bastion}", daemon=True
        )
        self._watcher.start()

    def _watch(self) -> None:
        """Wait for the process to end; unless it was closed, say so."""
        code = self.process.wait()
        if self._closing or not self.up or self._pid != os.getpid():
            return  # closed by us, or failed while starting (its opener raises the error)
        log.warning(
            "ssh master for bastion %s exited (%s): %s",
            self.bastion,
            code,
            self.files.reason() or "no message",
        )
        if self._on_death is not None:
            self._on_death()

    def is_active(self) -> bool:
        # The watcher thread reaps the process and sets returncode: an attribute read here
        # (pool checkouts call this), no system call.
        return self.process.returncode is None and os.getpid() == self._pid

    def mux(
        self, *args: str, timeout: float, remote: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[bytes]:
        """``ssh -S <control socket> <args> bastion [remote]``: a request to the running master."""
        command = [
            ssh_binary(), "-F", "/dev/null", "-o", "BatchMode=yes",
            "-S", str(self.files.control), *args, "--", "enginehouse-bastion", *remote,
        ]  # fmt: skip
        return subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            check=False,
        )

    def ask_nodelay(self, timeout: float) -> None:
        """Have the bastion's sshd turn Nagle off on this connection: one ``true`` run through it.

        sshd sets TCP_NODELAY on its end of the connection only when a session
        runs a command (``ssh_packet_set_interactive``, called from session.c);
        a forwarding-only connection keeps Nagle, so with several channels busy
        a small reply waits for the client's delayed ACK: the 35-50 ms stalls of
        issue 14 (docs/tunnels.md). Our end has it already (``ssh -N`` sets it).
        Best effort: a bastion that refuses the session keeps Nagle, nothing else.
        """
        try:
            done = self.mux("-T", timeout=timeout, remote=("true",))
        except subprocess.TimeoutExpired:
            log.info("bastion %s: the TCP_NODELAY session did not end in time", self.bastion)
            return
        if done.returncode != 0:
            reason = done.stderr.decode(errors="replace").strip()[-_REASON_LIMIT:]
            log.info("bastion %s: the TCP_NODELAY session failed: %s", self.bastion, reason)

    def close(self) -> None:
        """End the master (its forwards and connections with it) and remove its folder."""
        if os.getpid() != self._pid:
            return
        self._closing = True
        forking.untrack(self)
        process = self.process
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(_STOP_TIMEOUT)
        if self._watcher is not threading.current_thread():
            self._watcher.join(_STOP_TIMEOUT)
        self.files.remove()

    def after_fork_in_child(self) -> None:
        """The parent's master lives on; the child never signals it or removes its folder."""
        self._pid = -1


class OpenSSHForward:
    """A forward the master listens for; see :class:`~enginehouse.actors.ssh_transport.Forward`."""

    def __init__(self, owner: OpenSSHTransport, host: str, port: int, local_port: int) -> None:
        self.remote_host = host
        self.remote_port = port
        self.local_port = local_port
        self.opened = itertools.count()  # not counted: OpenSSH opens the channels
        self.failures = itertools.count()
        self.last_activity = time.monotonic()
        self._owner = owner

    @property
    def remote(self) -> str:
        return f"{self.remote_host}:{self.remote_port}"

    @property
    def active_channels(self) -> int:
        """Connections open on the local port now (the kernel's table; the master relays them)."""
        count = established_on(self.local_port)
        if count is None or count:
            # None: no kernel table to read (not Linux): never close this session as idle.
            self.last_activity = time.monotonic()
        return count or 0

    def close(self) -> None:
        self._owner.cancel(self)


def established_on(port: int) -> int | None:
    """How many established TCP connections have local port ``port`` (Linux ``/proc/net``).

    ``None`` when no table can be read.
    """
    wanted = f":{port:04X}"
    count = 0
    read = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                read = True
                next(rows, None)
                for row in rows:
                    fields = row.split()
                    if len(fields) > 3 and fields[3] == "01" and fields[1].endswith(wanted):
                        count += 1
        except OSError:
            continue
    return count if read else None


def free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the strategy --------------------------------------------------------------------


class OpenSSHTransport(SSHTransport):
    """``ssh -N -M`` per bastion, forwards by ``-O forward``; see the module docstring."""

    name = "openssh"

    def __init__(self, settings: TransportSettings) -> None:
        super().__init__(settings)
        self._master: OpenSSHMaster | None = None

    # -- session -----------------------------------------------------------------

    def open(self, forwards: Iterable[Forward]) -> Session:
        spec = self.settings.spec
        plan = HostKeyPlan.for_spec(spec, self.settings.known_hosts)
        key = plain_private_key(spec)
        files = SecretFiles()
        try:
            master = self._start(plan, files, key, forwards)
        except BaseException:
            files.remove()
            raise
        try:
            try:
                self._wait_until_up(master, plan)
            finally:
                files.remove_secrets()
            if plan.check_after:
                self._check_recorded_key(master, plan)
        except BaseException:
            master.close()
            raise
        master.up = True
        master.ask_nodelay(self.settings.connect_timeout)
        self._master = master
        return master

    def _start(
        self, plan: HostKeyPlan, files: SecretFiles, key: bytes | None, forwards: Iterable[Forward]
    ) -> OpenSSHMaster:
        command, env = self._command(plan, files, key, forwards)
        with open(files.log, "wb") as log_file:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                env=env,
                start_new_session=True,  # no terminal; a Ctrl-C to us is not sent to it
            )
        return OpenSSHMaster(process, files, self.bastion, self.settings.on_death)

    def _command(
        self,
        plan: HostKeyPlan,
        files: SecretFiles,
        key: bytes | None,
        forwards: Iterable[Forward],
    ) -> tuple[list[str], dict[str, str]]:
        settings = self.settings
        spec = settings.spec
        interval = max(math.ceil(settings.keepalive_interval), 1)  # ssh takes whole seconds
        missed = max(round(settings.keepalive_timeout / interval), 1)
        options = [
            "ControlMaster=yes",
            "ControlPersist=no",
            "ExitOnForwardFailure=yes",
            f"ConnectTimeout={max(math.ceil(settings.connect_timeout), 1)}",
            f"ServerAliveInterval={interval}",
            f"ServerAliveCountMax={missed}",
            "TCPKeepAlive=yes",
            "IdentitiesOnly=yes",
            "IdentityAgent=none",
            "KbdInteractiveAuthentication=no",
            "NumberOfPasswordPrompts=1",
            "LogLevel=ERROR",
            *plan.options(files),
        ]
        methods = []
        env = {name: value for name, value in os.environ.items() if not name.startswith("SSH_")}
        if key is not None:
            options.append(f"IdentityFile={files.key(key)}")
            methods.append("publickey")
        else:
            options.append("IdentityFile=none")
        if spec.password is not None:
            env["SSH_ASKPASS"] = str(files.askpass(spec.password.get_secret_value()))
            env["SSH_ASKPASS_REQUIRE"] = "force"
            env.setdefault("DISPLAY", "none")
            methods.append("password")
        options.append(f"PreferredAuthentications={','.join(methods) or 'none'}")
        options.append(f"BatchMode={'no' if spec.password is not None else 'yes'}")
        command = [ssh_binary(), "-N", "-F", "/dev/null", "-S", str(files.control)]
        for option in options:
            command += ["-o", option]
        for forward in forwards:
            command += [
                "-L",
                _forward_arg(forward.local_port, forward.remote_host, forward.remote_port),
            ]
        command += ["-p", str(spec.server_port), "-l", spec.username, "--", spec.server_address]
        return command, env

    def _wait_until_up(self, master: OpenSSHMaster, plan: HostKeyPlan) -> None:
        """Until the control socket exists: ssh made it after authentication and every ``-L``."""
        timeout = self.settings.connect_timeout
        deadline = time.monotonic() + 3 * timeout  # connect, key exchange, authentication
        while not master.files.control.exists():
            if master.process.poll() is not None:
                raise self._failure(master, plan)
            if time.monotonic() > deadline:
                raise TunnelError(  # ssh does not say which step hangs: name both
                    f"SSH handshake and authentication with bastion {self.bastion} did not "
                    f"complete within {3 * timeout:g}s"
                    + (f" ({master.files.reason()})" if master.files.reason() else "")
                )
            time.sleep(_POLL)

    def _failure(self, master: OpenSSHMaster, plan: HostKeyPlan) -> TunnelError:
        """What the ssh that exited before it was up said, as a TunnelError naming the step."""
        reason = master.files.reason()
        spec = self.settings.spec
        bastion = self.bastion
        lowered = reason.lower()
        if "revoked" in lowered:
            return TunnelError(f"host key of bastion {bastion} is marked @revoked ({reason})")
        if "host key verification failed" in lowered or "identification has changed" in lowered:
            return TunnelError(
                f"{plan.mismatch or f'host key mismatch for bastion {bastion}'}; "
                f"ssh refused the key it presented ({reason})"
            )
        if "permission denied" in lowered or "too many authentication" in lowered:
            tried = [
                name
                for name, given in (("key", spec.private_key), ("password", spec.password))
                if given is not None
            ]
            return TunnelError(
                f"SSH authentication failed at bastion {bastion} with the "
                f"{' and '.join(tried) or 'no credentials'} "
                "(wrong password, or key not authorized for this user)"
            )
        if "forward" in lowered or "bind" in lowered or "listen" in lowered:
            return TunnelError(f"bastion {bastion}: ssh could not set up a forward: {reason}")
        return TunnelError(f"cannot reach bastion {bastion}: {reason or 'ssh exited'}")

    def _check_recorded_key(self, master: OpenSSHMaster, plan: HostKeyPlan) -> None:
        """accept / pin-first with an unknown bastion: check and pin what ssh accepted."""
        settings = self.settings
        key = plan.recorded_key(master.files)
        if key is None:
            raise TunnelError(f"SSH session to bastion {self.bastion}: ssh recorded no host key")
        if verify_host_key(settings.spec, key, settings.known_hosts):
            pin_host_key(settings.spec, key, settings.known_hosts)

    def close(self) -> None:
        master, self._master = self._master, None
        if master is not None:
            master.close()

    # -- channels and forwards ----------------------------------------------------

    def probe(self, session: Session, host: str, port: int) -> None:
        """Open one channel through the master (``ssh -W``): did the bastion refuse it?"""
        master = self._require(session)
        try:
            done = master.mux("-W", _target(host, port), timeout=self.settings.connect_timeout)
        except subprocess.TimeoutExpired:
            return  # the channel opened and the far end waits for us: reachable
        if done.returncode == 0:
            return
        reason = done.stderr.decode(errors="replace").strip()[-_REASON_LIMIT:]
        if not master.is_active():
            raise TunnelError(
                f"SSH session to bastion {self.bastion} ended: {master.files.reason()}"
            )
        if "refused" in reason or "open failed" in reason:
            # The master's mux reports no more than "Session open refused by peer".
            raise TunnelError(
                f"bastion {self.bastion} cannot reach {host}:{port}: it refused the channel "
                f"({reason})"
            )
        raise TunnelError(
            f"opening a channel to {host}:{port} via bastion {self.bastion} failed: {reason}"
        )

    def listen(
        self, session: Session, host: str, port: int, local_port: int, opener: OpenerFactory
    ) -> Forward:
        master = self._require(session)
        for _attempt in range(3):
            chosen = local_port or free_local_port()
            try:
                done = master.mux(
                    "-O", "forward", "-L", _forward_arg(chosen, host, port),
                    timeout=self.settings.connect_timeout,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                raise OSError(errno.ETIMEDOUT, "ssh -O forward did not answer") from None
            if done.returncode == 0:
                return OpenSSHForward(self, host, port, chosen)
            if local_port or not master.is_active():
                break
        reason = done.stderr.decode(errors="replace").strip()[-_REASON_LIMIT:]
        raise OSError(errno.EADDRINUSE, reason or "ssh -O forward failed")

    def cancel(self, forward: OpenSSHForward) -> None:
        master = self._master
        if master is None or not master.is_active():
            return
        try:
            master.mux(
                "-O", "cancel", "-L",
                _forward_arg(forward.local_port, forward.remote_host, forward.remote_port),
                timeout=self.settings.connect_timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            log.warning("ssh -O cancel for %s via %s timed out", forward.remote, self.bastion)

    def _require(self, session: Session) -> OpenSSHMaster:
        if not isinstance(session, OpenSSHMaster):
            raise TypeError("the OpenSSH transport got a session it did not open")
        return session
