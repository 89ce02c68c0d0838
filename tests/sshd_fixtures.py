"""A throwaway OpenSSH server on a free loopback port, for tunnel tests and benchmarks.

``scripts/install-sshd.sh`` installs openssh-server when ``/usr/sbin/sshd`` is
missing. The server has its own config, generated host key, a password user
and authorized Ed25519, ECDSA and RSA keys (one RSA key passphrase-protected),
and allows TCP forwarding, so it forwards to the machine's PostgreSQL.
Each SSH connection is a child process of the sshd (``sessions()``); killing
those children drops the sessions, as a bastion restart would.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
import sqlalchemy.exc as sa_exc
from secret_scan import register_secret
from sqlalchemy import text

from enginehouse.actors.host_keys import HOST_KEY_PINS

ROOT = Path(__file__).resolve().parent.parent
# pin-first pins go to a known_hosts file of this run's own (inherited by the processes it
# starts), never to the user's ~/.local/state: throwaway servers reuse ports with new keys.
if "ENGINEHOUSE_SSH_KNOWN_HOSTS_FILE" not in os.environ:
    _own_dir = tempfile.mkdtemp(prefix="enginehouse-known-hosts-")
    os.environ["ENGINEHOUSE_SSH_KNOWN_HOSTS_FILE"] = str(Path(_own_dir) / "known_hosts")
    atexit.register(shutil.rmtree, _own_dir, ignore_errors=True)
KNOWN_HOSTS = Path(os.environ["ENGINEHOUSE_SSH_KNOWN_HOSTS_FILE"])
SSHD = "/usr/sbin/sshd"
USER = "ehtunnel"
PASSWORD = "tunnel-pass-0123"
KEY_PASSPHRASE = "key-phrase-4567"


def install_sshd() -> None:
    """Run the project's install script (apt-get only when sshd is missing)."""
    try:
        subprocess.run(["bash", str(ROOT / "scripts" / "install-sshd.sh")], check=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        from service_rule import service_unavailable

        service_unavailable("sshd", f"scripts/install-sshd.sh failed ({exc})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ensure_user() -> None:
    """The password user; several test runs may race here (useradd/chpasswd lock files)."""
    for _attempt in range(50):
        if subprocess.run(["id", USER], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "-m", "-s", "/bin/sh", USER], capture_output=True)
        done = subprocess.run(
            ["chpasswd"], input=f"{USER}:{PASSWORD}\n", text=True, capture_output=True
        )
        if done.returncode == 0:
            return
        time.sleep(0.1)  # another process holds /etc/passwd's lock: try again
    raise RuntimeError(f"could not set up user {USER}: {done.stderr.strip()}")


def _register_key(text: str) -> None:
    """Every body line of a private key is a secret no log or error may show."""
    register_secret(*(line for line in text.splitlines() if len(line) >= 20 and "--" not in line))


def _keygen(path: Path, kind: str, passphrase: str = "", pem: bool = False) -> None:
    args = ["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-f", str(path), "-C", path.name]
    if kind == "rsa":
        args += ["-b", "2048"]
    if pem:
        args += ["-m", "PEM"]
    subprocess.run(args, check=True)


class ThrowawaySshd:
    """One private sshd; see the module docstring."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.dir = workdir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.keys: dict[str, str] = {}
        self._host_key = self.dir / "host_ed25519"
        self._make_client_keys()
        self.new_host_key()

    # -- keys ------------------------------------------------------------------

    def _make_client_keys(self) -> None:
        specs = {
            "ed25519": ("ed25519", "", False),
            "ecdsa": ("ecdsa", "", False),
            "rsa": ("rsa", "", False),
            "rsa_pem_passphrase": ("rsa", KEY_PASSPHRASE, True),
            "ed25519_passphrase": ("ed25519", KEY_PASSPHRASE, False),
        }
        authorized = []
        for name, (kind, passphrase, pem) in specs.items():
            path = self.dir / f"client_{name}"
            _keygen(path, kind, passphrase, pem)
            self.keys[name] = path.read_text()
            _register_key(self.keys[name])
            authorized.append(Path(f"{path}.pub").read_text().strip())
        # A valid key that the server does not authorize.
        stranger = self.dir / "client_stranger"
        _keygen(stranger, "ed25519")
        self.keys["stranger"] = stranger.read_text()
        _register_key(self.keys["stranger"])
        keys_file = self.dir / "authorized_keys"
        keys_file.write_text("\n".join(authorized) + "\n")
        # sshd reads authorized keys as the user: let it in (mkdtemp makes 0700).
        self.dir.chmod(0o755)
        keys_file.chmod(0o644)

    def new_host_key(self) -> None:
        """Generate a new host key (takes effect at the next start)."""
        for path in (self._host_key, Path(f"{self._host_key}.pub")):
            path.unlink(missing_ok=True)
        _keygen(self._host_key, "ed25519")

    @property
    def host_key_line(self) -> str:
        """This server's key as a known_hosts line."""
        kind, blob = Path(f"{self._host_key}.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {blob}"

    # -- process -----------------------------------------------------------------

    def _config(self) -> Path:
        config = self.dir / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self._host_key}",
                    f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
                    f"PidFile {self.dir / 'sshd.pid'}",
                    "PermitRootLogin no",
                    "PasswordAuthentication yes",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "AllowTcpForwarding yes",
                    "UsePAM no",
                    "StrictModes no",
                    "MaxStartups 100",
                    "MaxSessions 100",
                    "MaxAuthTries 10",
                    "LoginGraceTime 30",
                    "UseDNS no",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        return config

    def start(self) -> None:
        config = self._config()
        log = open(self.dir / "sshd.log", "ab")  # noqa: SIM115 - kept open by the child
        self.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.dir / 'sshd.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd on port {self.port} did not come up")

    def stop(self) -> None:
        """Stop the listener and every session."""
        self.kill_sessions()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)
        self.kill_sessions()
        self.process = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def sessions(self) -> list[int]:
        """PIDs of the per-connection children (one per SSH connection)."""
        if self.process is None:
            return []
        found = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split()]

    def kill_sessions(self) -> int:
        """Drop every SSH connection (the listener stays up).

        Kills each session's whole tree: the unprivileged child holds the socket.
        """
        sessions = self.sessions()
        tree = list(sessions)
        for pid in sessions:
            tree += _children(pid)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(sessions)


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    pids = [int(child) for child in found.stdout.split()]
    return pids + [grandchild for child in pids for grandchild in _children(child)]


def tunnel_threads() -> list[threading.Thread]:
    """Threads our tunnels start: paramiko transports, forward listeners and relays."""
    return [
        thread
        for thread in threading.enumerate()
        if isinstance(thread, paramiko.Transport) or thread.name.startswith("enginehouse-")
    ]


def start_sshd(port: int | None = None) -> ThrowawaySshd:
    """Install if needed, then start a throwaway sshd in a new temp folder."""
    install_sshd()
    _ensure_user()
    server = ThrowawaySshd(Path(tempfile.mkdtemp(prefix="enginehouse-sshd-")), port)
    server.start()
    return server


def remove_sshd(server: ThrowawaySshd) -> None:
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)
    # A later server may get this port with another host key: forget the pin-first pins.
    HOST_KEY_PINS.pop(("127.0.0.1", server.port), None)
    forget_pins(server.port)


def forget_pins(port: int, path: Path = KNOWN_HOSTS) -> None:
    """Drop ``[127.0.0.1]:port`` lines from a known_hosts file (a test helper; not atomic)."""
    if path.exists():
        name = f"[127.0.0.1]:{port} "
        kept = [line for line in path.read_text().splitlines(True) if not line.startswith(name)]
        path.write_text("".join(kept))


@pytest.fixture(scope="session")
def shared_sshd() -> Iterator[ThrowawaySshd]:
    """A throwaway sshd shared by the session's tunnel tests (never stopped by a test)."""
    server = start_sshd()
    yield server
    remove_sshd(server)


@pytest.fixture
def sshd(shared_sshd: ThrowawaySshd) -> Iterator[ThrowawaySshd]:
    """The shared sshd, once no SSH session of an earlier test is left on it.

    A session's server process ends a little after its client closed the
    connection (later still on a loaded machine): a test that counts sessions
    must not start while one of the previous test is still ending, or it
    counts it as its own (issue 13, item 12). Waiting at setup, not teardown:
    fixtures set up before this one (a manager) are torn down after it.
    """
    settle_sessions(shared_sshd, "a previous test's SSH sessions to end")
    yield shared_sshd


def describe(server: ThrowawaySshd) -> str:
    """The session processes and who holds their connections (for failure messages)."""
    pids = ",".join(str(pid) for pid in server.sessions()) or "0"
    shown = subprocess.run(
        ["ps", "-o", "pid,etimes,args", "-p", pids], capture_output=True, text=True
    )
    peers = subprocess.run(
        ["ss", "-tnpa", f"( dport = :{server.port} )"], capture_output=True, text=True
    )
    return f"{shown.stdout.strip()}\nclients:\n{peers.stdout.strip()}"


def settle_sessions(server: ThrowawaySshd, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while server.sessions():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}: {describe(server)}")
        time.sleep(0.02)


@pytest.fixture
def private_sshd() -> Iterator[ThrowawaySshd]:
    """A throwaway sshd of one test's own, which it may stop, restart or re-key."""
    server = start_sshd()
    yield server
    remove_sshd(server)


class BlackHoleRelay:
    """A TCP relay in front of a server that can stop forwarding without closing anything.

    What a bastion that silently drops traffic looks like from here (a hung
    host, a NAT or firewall that lost the flow): our packets are still
    acknowledged (by this relay's kernel), no reply ever comes, no FIN, no RST.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.dropping = threading.Event()
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="test-blackhole", daemon=True).start()

    def black_hole(self) -> None:
        """From now on, bytes in either direction are read and dropped."""
        self.dropping.set()

    def restore(self) -> None:
        self.dropping.clear()

    def stalls_a_query(self, connection: Any, timeout: float) -> None:
        """Black-hole, then a query on ``connection`` fails (a DBAPIError) within ``timeout``.

        The query runs in a thread of its own: should it hang instead, the poll
        times out and the test fails rather than hangs.
        """
        from conftest import wait_until  # lazily: benchmarks import this module too

        self.black_hole()
        outcome: list[BaseException] = []

        def query() -> None:
            try:
                connection.execute(text("SELECT 2"))
            except BaseException as exc:  # recorded for the assertion below
                outcome.append(exc)

        threading.Thread(target=query, name="test-stalled-query", daemon=True).start()
        wait_until(lambda: outcome, timeout=timeout, what="the stuck query to fail")
        assert isinstance(outcome[0], sa_exc.DBAPIError), outcome[0]

    def close(self) -> None:
        """Close every socket; shut each down first, which ends it on the wire at once.

        A bare close() while a pump thread is blocked in recv() on the same socket
        leaves the connection open (the blocked call holds the file): sshd then kept
        a pre-auth session of a black-holed handshake for its LoginGraceTime, and the
        next test's ``sshd`` fixture timed out waiting for it to end.
        """
        self._closed = True
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            self._sockets += [client, upstream]
            if self._closed:  # close() ran while this pair was being made: end it too
                self.close()
                return
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(source, sink), name="test-blackhole", daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self.dropping.is_set():
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


def ssh_masters() -> list[int]:
    """This process's ``ssh -N -M`` children: the OpenSSH transport's masters."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid() and b"ControlMaster=yes" in argv:
            found.append(int(entry.name))
    return found
