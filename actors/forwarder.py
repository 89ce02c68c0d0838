"""A small TCP forwarder over paramiko channels: one local listener per remote end.

Why not sshtunnel: measured here, 17-27% of its new connections stall ~45 ms
and its ``stop()`` can block forever. This forwarder sets TCP_NODELAY on the
accepted socket, relays with two blocking loops per connection (no polling
timeouts, no select() on the channel), and its ``close()`` joins every thread
it started.

The listener is independent of the SSH transport: a restarted transport is
picked up by the next accepted connection, so the local port never changes.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable

import paramiko

from enginehouse import forking
from enginehouse.actors.ssh import quick_acks_for_a_while

log = logging.getLogger("enginehouse.tunnel")

ChannelOpener = Callable[[str, int, tuple[str, int]], paramiko.Channel]
"""``(remote_host, remote_port, origin) -> channel``; raises when no channel can be had."""

_CHUNK = 65536
_JOIN_TIMEOUT = 5.0
_ACCEPT_BACKOFF = (0.01, 0.5)  # first and longest pause after a failed accept()
_TRANSIENT_ACCEPT_ERRORS = frozenset(
    {
        errno.EMFILE,  # out of file descriptors: in this process
        errno.ENFILE,  # ... or system-wide
        errno.ENOBUFS,
        errno.ENOMEM,
        errno.ECONNABORTED,  # the client gave up while queued
        errno.EPROTO,
        errno.EPERM,  # firewall rules (Linux)
        errno.EINTR,
    }
)


class _Relay:
    """One accepted connection and, once opened, its channel."""

    __slots__ = ("channel", "client", "thread")

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.channel: paramiko.Channel | None = None
        self.thread: threading.Thread | None = None

    def abort(self) -> None:
        """Wake the relay thread: shutting the socket down makes it readable (EOF)."""
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_RDWR)
        channel = self.channel
        if channel is not None:
            channel.close()


class PortForward:
    """Listens on 127.0.0.1 and relays each connection to ``remote_host:remote_port``.

    Raises ``OSError`` when the local port cannot be bound (for example in use).
    """

    def __init__(
        self,
        remote_host: str,
        remote_port: int,
        opener: ChannelOpener,
        *,
        local_port: int = 0,
    ) -> None:
        self.remote_host = remote_host
        self.remote_port = remote_port
        self._opener = opener
        self._listener = socket.create_server(("127.0.0.1", local_port), backlog=128)
        self.local_port: int = self._listener.getsockname()[1]
        self._relays: dict[int, _Relay] = {}
        self._ids = itertools.count()
        self.opened = itertools.count()
        self.failures = itertools.count()
        self.last_activity = time.monotonic()
        self._closing = False
        self._closed = threading.Event()  # wakes the accept loop out of a backoff pause
        self.accept_errors = itertools.count()
        forking.track(self)
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"enginehouse-forward-{self.local_port}", daemon=True
        )
        self._acceptor.start()

    @property
    def remote(self) -> str:
        return f"{self.remote_host}:{self.remote_port}"

    @property
    def active_channels(self) -> int:
        return len(self._relays)

    def close(self) -> None:
        """Stop accepting, end every relay, join every thread."""
        self._closing = True
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        self._acceptor.join(_JOIN_TIMEOUT)
        relays = list(self._relays.values())
        for relay in relays:
            relay.abort()
        for relay in relays:
            if relay.thread is not None:
                # A relay still opening its channel may be waiting for the very actor that
                # is closing us: it ends on its own once that actor moves on.
                relay.thread.join(_JOIN_TIMEOUT if relay.channel is not None else 0.2)

    # -- threads -----------------------------------------------------------------

    def after_fork_in_child(self) -> None:
        """Close the child's copies of the listener and relayed sockets (the parent keeps its own).

        ``close()`` only: ``shutdown()`` would end the parent's connections too.
        """
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for relay in list(self._relays.values()):
            with contextlib.suppress(OSError):
                relay.client.close()
        self._relays.clear()

    def _accept_loop(self) -> None:
        try:
            self._accept_until_closed()
        finally:
            # Never leave the port open with nobody accepting: clients would hang.
            with contextlib.suppress(OSError):
                self._listener.close()

    def _accept_until_closed(self) -> None:
        pause = 0.0
        while not self._closing:
            try:
                client, origin = self._listener.accept()
            except OSError as exc:
                if self._closing or exc.errno not in _TRANSIENT_ACCEPT_ERRORS:
                    if not self._closing:
                        log.error("forward %s stops accepting: %s", self.remote, exc)
                    return
                pause = self._back_off(exc, pause)
                continue
            if pause:
                log.info("forward %s accepts again", self.remote)
                pause = 0.0
            if self._closing:
                client.close()
                return
            with contextlib.suppress(OSError):  # a client that already reset: its relay ends
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.last_activity = time.monotonic()
            relay_id = next(self._ids)
            relay = _Relay(client)
            relay.thread = threading.Thread(
                target=self._serve,
                args=(relay_id, relay, origin),
                name=f"enginehouse-relay-{self.local_port}-{relay_id}",
                daemon=True,
            )
            self._relays[relay_id] = relay
            try:
                relay.thread.start()
            except RuntimeError as exc:  # "can't start new thread": refuse this one, go on
                self._relays.pop(relay_id, None)
                client.close()
                pause = self._back_off(OSError(errno.EAGAIN, str(exc)), pause)

    def _back_off(self, exc: OSError, pause: float) -> float:
        """Pause after a failed ``accept()`` (doubling, bounded); log once per streak."""
        next(self.accept_errors)
        if not pause:
            log.warning(
                "forward %s: accept() failed (%s): retrying until it succeeds",
                self.remote,
                errno.errorcode.get(exc.errno or 0, exc),
            )
        pause = min(max(pause * 2, _ACCEPT_BACKOFF[0]), _ACCEPT_BACKOFF[1])
        self._closed.wait(pause)
        return pause

    def _serve(self, relay_id: int, relay: _Relay, origin: tuple[str, int]) -> None:
        try:
            try:
                relay.channel = self._opener(self.remote_host, self.remote_port, origin)
            except Exception as exc:  # the client sees a closed connection; we log why
                next(self.failures)
                log.warning("no SSH channel to %s: %s", self.remote, exc)
                return
            next(self.opened)
            if self._closing:
                return
            _pump(relay.client, relay.channel)
        finally:
            if relay.channel is not None:
                with contextlib.suppress(Exception):  # paramiko raises EOFError on a dead link
                    relay.channel.close()
            relay.client.close()
            self._relays.pop(relay_id, None)
            self.last_activity = time.monotonic()


def _pump(client: socket.socket, channel: paramiko.Channel) -> None:
    """Copy bytes both ways until either side closes, one blocking loop per direction.

    Two plain blocking loops, not a selector: selecting on a paramiko channel
    makes it write to an OS pipe for every packet just to wake select(), which
    cost about a fifth of the time a tunnel adds to a round trip.
    """
    downstream = threading.Thread(
        target=_copy,
        args=(channel.recv, client.sendall, client, channel),
        name=f"{threading.current_thread().name}-down",
        daemon=True,
    )
    downstream.start()
    try:
        _copy(client.recv, channel.sendall, client, channel)
    finally:
        downstream.join(_JOIN_TIMEOUT)


def _copy(
    recv: Callable[[int], bytes],
    send: Callable[[bytes], object],
    client: socket.socket,
    channel: paramiko.Channel,
) -> None:
    """One direction; when it ends, end both so the other loop wakes (EOF) too."""
    try:
        while data := recv(_CHUNK):
            send(data)
    except (OSError, EOFError, paramiko.SSHException):
        pass
    finally:
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)
        # sshd answers a close with small packets: ACK them at once, so the next
        # channel's confirmation is not held behind them (issue 14).
        quick_acks_for_a_while(getattr(channel, "get_transport", lambda: None)())
        with contextlib.suppress(Exception):  # paramiko raises EOFError on a dead link
            channel.close()
