"""How a TunnelSupervisor talks SSH to its bastion: a strategy chosen by ``ssh_transport``.

- :class:`ParamikoTransport` (the default): one paramiko ``Transport`` per bastion,
  our :class:`~enginehouse.actors.heartbeat.Heartbeat`, and local listeners relayed in
  Python (:class:`~enginehouse.actors.forwarder.PortForward`).
- :class:`~enginehouse.actors.openssh.OpenSSHTransport`: a supervised OpenSSH client
  (``ssh -N -M``, a ControlMaster) per bastion whose forwards are added with
  ``ssh -O forward``; OpenSSH relays in C.

The supervisor keeps the contract (one session per bastion, lazy connect, restarts
under its policy, idle close, stats); the strategy opens, probes, forwards and closes.
A strategy instance belongs to one supervisor and is used from its actor thread only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import paramiko

from enginehouse.actors.forwarder import ChannelOpener, PortForward
from enginehouse.actors.heartbeat import Heartbeat
from enginehouse.actors.ssh import connect, load_private_key
from enginehouse.errors import TunnelError
from enginehouse.specs import SSHTunnelSpec

log = logging.getLogger("enginehouse.tunnel")
_JOIN_TIMEOUT = 5.0


class Session(Protocol):
    """A live SSH session to the bastion, as ``Link.transport`` holds it (read by other threads)."""

    def is_active(self) -> bool: ...


class Forward(Protocol):
    """One ``127.0.0.1:local_port -> remote_host:remote_port`` forward, as the supervisor sees."""

    remote_host: str
    remote_port: int
    local_port: int
    last_activity: float

    @property
    def remote(self) -> str: ...

    @property
    def active_channels(self) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class TransportSettings:
    """What every strategy needs to open a session (the supervisor's settings)."""

    spec: SSHTunnelSpec
    connect_timeout: float
    keepalive_interval: float = 5.0
    keepalive_timeout: float = 5.0
    known_hosts: Path | None = None
    on_death: Callable[[], None] | None = None
    """Called (from another thread) when a session ends without being closed: the
    OpenSSH transport's forwards live in its process, so the supervisor reconnects
    at once rather than on next use."""


OpenerFactory = Callable[[], ChannelOpener]
"""Builds the channel opener a paramiko listener calls (the supervisor's ``channel_opener``)."""


class SSHTransport:
    """A strategy: template methods the :class:`TunnelSupervisor` calls, in its actor thread."""

    name = "abstract"

    def __init__(self, settings: TransportSettings) -> None:
        self.settings = settings

    @property
    def bastion(self) -> str:
        return self.settings.spec.bastion

    def open(self, forwards: Iterable[Forward]) -> Session:
        """A new authenticated session; ``forwards``: those the last session carried."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the current session (if any) and wait until it is gone."""
        raise NotImplementedError

    def probe(self, session: Session, host: str, port: int) -> None:
        """Raise :class:`TunnelError` when ``host:port`` is unreachable."""
        raise NotImplementedError

    def listen(
        self, session: Session, host: str, port: int, local_port: int, opener: OpenerFactory
    ) -> Forward:
        """A forward to ``host:port`` on ``127.0.0.1:local_port`` (0: any free port).

        Raises ``OSError`` when the local port cannot be had.
        """
        raise NotImplementedError

    def after_fork_in_child(self, session: Session | None) -> None:
        """In a forked child: drop the child's copies; never end the parent's session."""


def ask_nodelay(transport: paramiko.Transport, bastion: str, timeout: float) -> None:
    """Have the bastion's sshd turn Nagle off on this connection: one ``true`` run through it.

    sshd sets TCP_NODELAY on its end of the connection only when a session
    runs a command (``ssh_packet_set_interactive``, called from session.c); a
    forwarding-only connection keeps Nagle, so with several channels busy a
    small reply waits for our delayed ACK: the 35-50 ms stalls of issue 14
    (docs/tunnels.md). paramiko waits for sshd's answer to ``exec`` without a
    timeout, so the request runs on a thread of its own and we wait for it at
    most ``timeout`` seconds: a bastion that never answers costs the supervisor
    no more than that (the thread ends when the transport closes). Best effort:
    a bastion that refuses the session keeps Nagle, nothing else.
    """
    asking = threading.Thread(
        target=_run_true, args=(transport, bastion, timeout),
        name=f"enginehouse-nodelay-{bastion}", daemon=True,
    )  # fmt: skip
    asking.start()
    asking.join(timeout)
    if asking.is_alive():
        log.info("bastion %s: no answer to the TCP_NODELAY session within %gs", bastion, timeout)


def _run_true(transport: paramiko.Transport, bastion: str, timeout: float) -> None:
    """Open one session channel, exec ``true`` in it, close it (see :func:`ask_nodelay`)."""
    try:
        channel = transport.open_session(timeout=timeout)
        try:
            channel.exec_command("true")
        finally:
            channel.close()
    except (paramiko.SSHException, EOFError, OSError) as exc:
        log.info("bastion %s: the TCP_NODELAY session failed: %s", bastion, exc)


class ParamikoTransport(SSHTransport):
    """paramiko session + Heartbeat thread + Python relays (see the module docstring)."""

    name = "paramiko"

    def __init__(self, settings: TransportSettings) -> None:
        super().__init__(settings)
        self._key: paramiko.PKey | None = None
        self._transport: paramiko.Transport | None = None
        self._heartbeat: Heartbeat | None = None

    def open(self, forwards: Iterable[Forward]) -> Session:
        settings = self.settings
        if self._key is None and settings.spec.private_key is not None:
            self._key = load_private_key(settings.spec)
        transport = connect(
            settings.spec,
            self._key,
            settings.connect_timeout,
            known_hosts=settings.known_hosts,
            dead_after=settings.keepalive_interval + settings.keepalive_timeout,
        )
        self._heartbeat = Heartbeat(
            transport,
            self.bastion,
            interval=settings.keepalive_interval,
            timeout=settings.keepalive_timeout,
        )
        self._transport = transport
        ask_nodelay(transport, self.bastion, settings.connect_timeout)
        return transport  # listeners outlive transports: ``forwards`` need nothing

    def close(self) -> None:
        transport, self._transport = self._transport, None
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.stop()
        if transport is not None:
            transport.close()
            if transport.is_alive():  # close() leaves its thread to notice within ~0.1 s
                transport.join(_JOIN_TIMEOUT)
        if heartbeat is not None:
            heartbeat.join(_JOIN_TIMEOUT)  # its ping returns once the transport is closed

    def probe(self, session: Session, host: str, port: int) -> None:
        transport: Any = session
        try:
            channel = transport.open_channel(
                "direct-tcpip",
                (host, port),
                ("127.0.0.1", 0),
                timeout=self.settings.connect_timeout,
            )
        except paramiko.ChannelException as exc:
            raise TunnelError(
                f"bastion {self.bastion} cannot reach {host}:{port}: {exc.text}"
            ) from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise TunnelError(
                f"opening a channel to {host}:{port} via bastion {self.bastion} failed: {exc}"
            ) from None
        channel.close()

    def listen(
        self, session: Session, host: str, port: int, local_port: int, opener: OpenerFactory
    ) -> Forward:
        return PortForward(host, port, opener(), local_port=local_port)

    def after_fork_in_child(self, session: Session | None) -> None:
        sock = getattr(session, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()  # close(), not shutdown(): the parent's session lives on


TRANSPORTS = ("paramiko", "openssh")
"""The values of the ``ssh_transport`` setting."""


def transport_for(name: str, settings: TransportSettings) -> SSHTransport:
    """The strategy named ``name`` (``paramiko`` or ``openssh``) for one supervisor."""
    if name == "paramiko":
        return ParamikoTransport(settings)
    if name == "openssh":
        from enginehouse.actors.openssh import OpenSSHTransport

        return OpenSSHTransport(settings)
    raise TunnelError(f"ssh_transport {name!r} is not one of: {', '.join(TRANSPORTS)}")
