"""The DisconnectWatcher actor: frees a closed connection's permit once the server has dropped it.

A permit must not move on while the server still counts the old connection,
or ``pg_stat_activity`` could briefly show it next to the new one. Knowing
that takes end of file on a duplicate of the connection's socket: about
1.5 ms on a healthy PostgreSQL, up to ``wait`` seconds on a dead network.
This actor does that waiting, so the thread that closed the connection (a
caller, or the registry disposing an engine) goes on at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pykka

from enginehouse.actors.supervisor import report_crash
from enginehouse.messages.budget import Lease, WatchClose

SERVER_GONE_WAIT = 1.0
"""Longest wait, in s, for the server to drop a closed connection."""


class DisconnectWatcher(pykka.ThreadingActor):
    """Waits for closed connections to be gone, then gives their permits back."""

    use_daemon_thread = True

    def __init__(
        self,
        release: Callable[[Lease], None],
        *,
        wait: float = SERVER_GONE_WAIT,
        supervisor: pykka.ActorRef[Any] | None = None,
        name: str = "closer",
    ) -> None:
        super().__init__()
        self._release = release
        self._wait = wait
        self._supervisor = supervisor
        self._name = name

    def on_failure(self, exc_type: Any, exc: Any, tb: Any) -> None:
        report_crash(self._supervisor, self._name, self.actor_urn, exc)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, WatchClose):
            try:
                wait_until_gone(message.watch, deadline=message.closed_at + self._wait)
            finally:
                self._release(message.lease)
            return None
        raise TypeError(f"unexpected message {type(message).__name__}")


def close_watching(dbapi_connection: Any) -> socket.socket | None:
    """Close a DBAPI connection; return a duplicate of its socket, open past the close.

    End of file on the duplicate then means the server's side is gone (None:
    the connection had no socket to watch).
    """
    watch = None
    with contextlib.suppress(Exception):
        fileno = getattr(dbapi_connection, "fileno", None)
        descriptor = fileno() if callable(fileno) else -1
        if descriptor >= 0:
            watch = socket.socket(fileno=os.dup(descriptor))
    with contextlib.suppress(Exception):
        dbapi_connection.close()
    return watch


def wait_until_gone(watch: socket.socket, *, deadline: float) -> None:
    """Read ``watch`` until end of file (the server's side is gone) or ``deadline``; close it."""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            watch.settimeout(remaining)
            if not watch.recv(4096):
                return
    except OSError:
        return
    finally:
        watch.close()
