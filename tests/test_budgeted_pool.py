"""BudgetedQueuePool on its own: a permit per physical connection, resizing, shedding, recreate.

The permit source here is a plain counter with the Budgets' interface (the
whole budget machinery is exercised by the fleet and tunnel budget tests);
the connections are real SQLite connections.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from enginehouse.budgeted_pool import BudgetedQueuePool
from enginehouse.errors import PoolExhaustedError

KEY = "db:test"


class Board:
    def __init__(self) -> None:
        self.shed: dict[str, Iterator[int]] = {}


class Permits:
    """A budget of ``cap`` permits that refuses at once when none is free."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.board = Board()
        self.held: set[int] = set()
        self.spent_elsewhere = False
        self._ids = itertools.count()

    def acquire(self, key: str, cap: int, timeout: float) -> int:
        assert (key, cap) == (KEY, self.cap)
        if self.spent_elsewhere or len(self.held) >= self.cap:
            raise PoolExhaustedError(f"budget {key}: no permit left")
        lease = next(self._ids)
        self.held.add(lease)
        return lease

    def release(self, lease: int) -> None:
        self.held.discard(lease)

    def closing(self, dbapi_connection: Any, lease: int) -> None:
        dbapi_connection.close()
        self.release(lease)


@pytest.fixture
def database(tmp_path: Path) -> str:
    return str(tmp_path / "budget.db")


def make_pool(database: str, cap: int, **kw: Any) -> tuple[BudgetedQueuePool, Permits]:
    def connect() -> sqlite3.Connection:
        return sqlite3.connect(database, check_same_thread=False)

    pool = BudgetedQueuePool(connect, **{"pool_size": 5, "max_overflow": 10, "timeout": 5, **kw})
    permits = Permits(cap)
    pool.attach(permits, KEY, cap)
    return pool, permits


def test_the_bound_is_the_cap_or_the_pools_own_if_smaller(database: str) -> None:
    assert make_pool(database, 4)[0].limit == 4
    assert make_pool(database, 40, pool_size=2, max_overflow=1)[0].limit == 3
    assert make_pool(database, 7, pool_size=0)[0].limit == 7  # pool_size 0: unbounded of its own


def test_each_physical_connection_holds_one_permit(database: str) -> None:
    pool, permits = make_pool(database, 3)
    first, second = pool.connect(), pool.connect()
    assert len(permits.held) == 2 and pool.connections == 2
    first.close()
    second.close()
    assert len(permits.held) == 2  # pooled connections keep their permits
    again = pool.connect()
    assert len(permits.held) == 2  # a pooled connection costs no permit
    again.invalidate()  # closed: its permit goes back
    assert len(permits.held) == 1
    detached = pool.connect()
    detached.detach()
    detached.close()  # a detached connection closes for good: its permit too
    assert permits.held == set()
    pool.dispose()
    assert permits.held == set()


def test_waiting_past_pool_timeout_names_the_budget(database: str) -> None:
    pool, _ = make_pool(database, 1, timeout=0.2)
    held = pool.connect()
    with pytest.raises(PoolExhaustedError, match=f"budget {KEY}: .*max_connections=1"):
        pool.connect()
    held.close()


def test_a_refused_permit_leaves_no_connection_counted(database: str) -> None:
    pool, permits = make_pool(database, 2)
    permits.spent_elsewhere = True
    with pytest.raises(PoolExhaustedError):
        pool.connect()
    assert pool.connections == 0


def test_a_failed_connect_gives_its_permit_back(tmp_path: Path) -> None:
    def broken() -> sqlite3.Connection:
        return sqlite3.connect(str(tmp_path / "missing" / "x.db"))

    pool = BudgetedQueuePool(broken, pool_size=1, max_overflow=0)
    permits = Permits(1)
    pool.attach(permits, KEY, 1)
    with pytest.raises(sqlite3.OperationalError):
        pool.connect()
    assert permits.held == set() and pool.connections == 0


def test_shed_idle_closes_idle_connections_and_they_reconnect_on_demand(database: str) -> None:
    pool, permits = make_pool(database, 3)
    for connection in [pool.connect(), pool.connect()]:
        connection.close()
    assert pool.shed_idle(1) == 1
    assert len(permits.held) == 1 and pool.connections == 2  # the record stays, empty
    with_one = [pool.connect(), pool.connect()]
    assert len(permits.held) == 2  # the empty record connected again, with a permit
    for connection in with_one:
        connection.close()
    pool.dispose()


def test_a_shed_token_closes_the_connection_checked_in(database: str) -> None:
    pool, permits = make_pool(database, 3)
    connection = pool.connect()
    permits.board.shed[KEY] = iter(range(1))
    connection.close()
    assert permits.held == set()
    other = pool.connect()
    other.close()
    assert len(permits.held) == 1  # the token was spent: this one stays
    pool.dispose()


def test_shrinking_drops_empty_records_beyond_the_new_limit(database: str) -> None:
    pool, permits = make_pool(database, 3)
    connections = [pool.connect() for _ in range(3)]
    for connection in connections:
        connection.close()
    pool.shed_idle(3)
    pool.resize(1)
    assert pool.limit == 1 and pool.connections == 1
    assert permits.held == set()
    pool.dispose()


def test_growing_wakes_a_thread_waiting_in_the_queue(database: str) -> None:
    pool, permits = make_pool(database, 2, timeout=30)
    pool.resize(1)
    held = pool.connect()
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(pool.connect()), daemon=True)
    waiter.start()
    wait_until(lambda: pool.checkedout() == 1 and waiter.is_alive(), what="the waiter to block")
    pool.resize(2)
    wait_until(lambda: got, what="the waiter to get a connection")
    waiter.join(5)
    assert len(permits.held) == 2
    held.close()
    got[0].close()  # type: ignore[attr-defined]
    pool.dispose()


def test_recreate_keeps_the_budget_and_the_share(database: str) -> None:
    pool, permits = make_pool(database, 4, pool_size=2, max_overflow=1)
    pool.connect().close()
    pool.resize(2)
    fresh = pool.recreate()
    pool.dispose()
    assert permits.held == set()
    assert isinstance(fresh, BudgetedQueuePool)
    assert (fresh.own_limit, fresh.limit, fresh.budget_key) == (3, 2, KEY)
    fresh.connect().close()
    assert len(permits.held) == 1
    assert "budget db:test" in fresh.status()
    fresh.dispose()
    assert permits.held == set()
