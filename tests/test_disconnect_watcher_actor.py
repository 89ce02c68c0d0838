"""The DisconnectWatcher actor (through its messages) and the close path that uses it.

A socket pair stands in for a connection's socket and the server's side of
it: the permit may move on only once the "server" side is closed.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pykka
import pytest

from enginehouse import EngineManager
from enginehouse.actors.disconnect_watcher import DisconnectWatcher
from enginehouse.messages.budget import Lease, WatchClose

LEASE = Lease("db:closer-test", "p|1", 0)


@pytest.fixture
def released() -> Iterator[tuple[list[Lease], threading.Event]]:
    yield [], threading.Event()


def start(released: tuple[list[Lease], threading.Event], wait: float) -> pykka.ActorRef[Any]:
    leases, event = released

    def release(lease: Lease) -> None:
        leases.append(lease)
        event.set()

    return DisconnectWatcher.start(release, wait=wait)


def test_the_permit_moves_on_once_the_server_side_is_gone(
    released: tuple[list[Lease], threading.Event],
) -> None:
    closer = start(released, wait=30)
    ours, server = socket.socketpair()
    try:
        closer.tell(WatchClose(ours, LEASE, time.monotonic()))
        assert not released[1].wait(0.3)  # the server still holds its side
        server.close()
        assert released[1].wait(10)
        assert released[0] == [LEASE]
    finally:
        server.close()
        closer.stop()


def test_a_server_that_never_lets_go_costs_at_most_the_bound(
    released: tuple[list[Lease], threading.Event],
) -> None:
    closer = start(released, wait=0.2)
    ours, server = socket.socketpair()
    try:
        closer.tell(WatchClose(ours, LEASE, time.monotonic()))
        assert released[1].wait(10)  # given back after 0.2 s although the peer is open
        assert released[0] == [LEASE] and ours.fileno() == -1  # and the duplicate is closed
    finally:
        server.close()
        closer.stop()


def test_unknown_messages_are_refused(released: tuple[list[Lease], threading.Event]) -> None:
    closer = start(released, wait=1)
    try:
        with pytest.raises(TypeError, match="unexpected message"):
            closer.ask("hello", timeout=5)
    finally:
        closer.stop()


class FakeConnection:
    """A DBAPI connection as far as the close path cares: a socket, and close()."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()


def test_the_closing_thread_does_not_wait_for_the_server(poll: Any) -> None:
    """The pool's close event returns at once; the permit follows when the server lets go."""
    with EngineManager(cleanup_interval=60, ask_timeout=10) as manager:
        budgets = manager._budgets  # private: the close path, without a real server
        lease = budgets.acquire("db:closer-test", 1, 5)
        ours, server = socket.socketpair()
        connection = FakeConnection(ours)
        budgets._track(connection, lease)

        def held() -> int:
            return next(b.held for b in manager.stats().budgets if b.key == lease.key)

        budgets._closed_detached(connection)  # what the pool's close event calls
        assert held() == 1  # returned while the "server" still holds the connection
        server.close()
        poll(lambda: held() == 0, what="the permit to come back")
