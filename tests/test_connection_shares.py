"""``extra.connection_shares``: a capped pool shared by request source, on the real PostgreSQL.

Every scenario holds connections until the test lets them go (threads block
on events), so the assertions are about who holds what, never about timing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from conftest import PG_URI, wait_until
from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.budgeted_pool import BudgetedQueuePool
from enginehouse.errors import InvalidSpecError, PoolExhaustedError
from enginehouse.shares import FairQueue

pytestmark = pytest.mark.services("postgres")

SHARES = {"DASHBOARD": 3, "SQL_LAB": 1}


def spec(database_id: int, shares: dict[str, Any] | None = SHARES, **extra: Any) -> DatabaseSpec:
    extra = {"max_connections": 4, "engine_params": {"pool_timeout": 30}, **extra}
    if shares is not None:
        extra["connection_shares"] = shares
    return DatabaseSpec(id=database_id, uri=PG_URI, extra=extra)


class Holders:
    """Threads that each check out a connection of ``source`` and hold it until released."""

    def __init__(self, manager: EngineManager, database: DatabaseSpec) -> None:
        self.manager, self.database = manager, database
        self.got: list[str] = []  # sources, in the order they got a connection
        self.errors: list[BaseException] = []
        self._release: list[threading.Event] = []
        self._threads: list[threading.Thread] = []

    def start(self, source: str, count: int = 1) -> None:
        for _ in range(count):
            release = threading.Event()
            thread = threading.Thread(target=self._hold, args=(source, release), daemon=True)
            self._release.append(release)
            self._threads.append(thread)
            thread.start()

    def _hold(self, source: str, release: threading.Event) -> None:
        try:
            with self.manager.connect(self.database, source=source) as connection:
                connection.execute(text("SELECT pg_sleep(0.05)"))
                self.got.append(source)
                release.wait(60)
        except BaseException as exc:
            self.errors.append(exc)

    def release(self, index: int) -> None:
        self._release[index].set()

    def stop(self) -> None:
        for release in self._release:
            release.set()
        for thread in self._threads:
            thread.join(60)


@pytest.fixture
def holders(manager: EngineManager) -> Iterator[Callable[[DatabaseSpec], Holders]]:
    with ExitStack() as stack:

        def make(database: DatabaseSpec) -> Holders:
            made = Holders(manager, database)
            stack.callback(made.stop)
            return made

        yield make


def got_count(run: Holders, count: int) -> Callable[[], bool]:
    """Whether ``count`` holders got a connection so far."""
    return lambda: len(run.got) == count


def fair_queue(manager: EngineManager, database: DatabaseSpec) -> FairQueue:
    pool = manager.get(database).pool
    assert isinstance(pool, BudgetedQueuePool) and pool.fair.shared
    return pool.fair


def test_shares_select_the_fair_pool_and_keep_it_after_dispose(manager: EngineManager) -> None:
    engine = manager.get(spec(1501))
    assert isinstance(engine.pool, BudgetedQueuePool) and engine.pool.limit == 4
    assert engine.pool.fair is not None and engine.pool.fair.weights["DASHBOARD"] == 3
    engine.dispose()
    assert isinstance(engine.pool, BudgetedQueuePool) and engine.pool.fair is not None
    plain = manager.get(spec(1502, shares=None))
    assert isinstance(plain.pool, BudgetedQueuePool) and not plain.pool.fair.shared


def test_without_a_cap_the_pools_own_size_is_the_cap(manager: EngineManager) -> None:
    database = DatabaseSpec(id=1503, uri=PG_URI, extra={
        "connection_shares": SHARES, "engine_params": {"pool_size": 2, "max_overflow": 1}})
    pool = manager.get(database).pool
    assert isinstance(pool, BudgetedQueuePool) and pool.fair is not None and pool.limit == 3


def test_long_sql_lab_holders_cannot_starve_dashboards(
    manager: EngineManager, holders: Callable[[DatabaseSpec], Holders]
) -> None:
    database = spec(1504)
    fair = fair_queue(manager, database)
    run = holders(database)
    run.start("SQL_LAB", 4)  # SQL Lab alone takes the whole cap
    wait_until(lambda: fair.checked_out()["SQL_LAB"] == 4, what="SQL Lab holds all 4")
    run.start("SQL_LAB", 4)  # more SQL Lab queue first...
    wait_until(lambda: fair.waiting()["SQL_LAB"] == 4, what="4 SQL Lab waiters")
    run.start("DASHBOARD", 4)  # ...then the dashboards
    wait_until(lambda: fair.waiting()["DASHBOARD"] == 4, what="4 dashboard waiters")
    for index in range(4):  # the first SQL Lab holders finish, one at a time
        run.release(index)
        wait_until(got_count(run, 5 + index), what=f"hand-over {index + 1}")
    assert run.errors == []
    # Each returned connection went to the source furthest below its share: 3 to the
    # dashboards, then 1 to SQL Lab: exactly the 3:1 weights, although SQL Lab queued first.
    assert run.got[4:] == ["DASHBOARD", "DASHBOARD", "DASHBOARD", "SQL_LAB"]
    assert fair.checked_out() == {"*": 0, "DASHBOARD": 3, "SQL_LAB": 1}
    assert fair.waiting() == {"*": 0, "DASHBOARD": 1, "SQL_LAB": 3}


def test_without_shares_the_queue_is_first_come_first_served(
    manager: EngineManager, holders: Callable[[DatabaseSpec], Holders]
) -> None:
    """The control: the same scenario without shares gives every connection to SQL Lab."""
    database = spec(1505, shares=None)
    pool = manager.get(database).pool
    assert isinstance(pool, BudgetedQueuePool)
    run = holders(database)
    run.start("SQL_LAB", 4)
    wait_until(lambda: pool.checkedout() == 4, what="SQL Lab holds all 4")
    run.start("SQL_LAB", 4)
    wait_until(lambda: len(run.got) == 4 and pool.fair.waiting()["*"] == 4, what="SQL Lab waits")
    run.start("DASHBOARD", 4)
    wait_until(lambda: pool.fair.waiting()["*"] == 8, what="dashboards wait")
    for index in range(4):
        run.release(index)
        wait_until(got_count(run, 5 + index), what=f"hand-over {index + 1}")
    assert run.got[4:] == ["SQL_LAB"] * 4


@pytest.mark.parametrize("shares", [None, SHARES], ids=["fifo", "shares"])
def test_a_returned_connection_goes_to_the_longest_waiter_not_back_to_its_holder(
    manager: EngineManager, shares: dict[str, Any] | None
) -> None:
    """Closed loop on a cap of 1: the thread that returns a connection and asks again queues.

    (SQLAlchemy's QueuePool lets it take the connection right back: whoever holds the
    pool keeps it, and the waiter starves until its pool_timeout.)
    """
    database = spec(1510, shares=shares, max_connections=1)
    pool = manager.get(database).pool
    assert isinstance(pool, BudgetedQueuePool)
    got: list[str] = []
    errors: list[BaseException] = []
    release = {name: threading.Event() for name in ("first", "waiter", "again")}

    def hold(name: str, then: str | None = None) -> None:
        try:
            for step in (name, then):
                if step is None:
                    return
                with manager.connect(database, source="SQL_LAB") as connection:
                    connection.execute(text("SELECT 1"))
                    got.append(step)
                    release[step].wait(60)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hold, args=("first", "again"), daemon=True)]
    threads[0].start()
    wait_until(lambda: got == ["first"], what="the first holds the only connection")
    threads.append(threading.Thread(target=hold, args=("waiter",), daemon=True))
    threads[1].start()
    wait_until(lambda: sum(pool.fair.waiting().values()) == 1, what="a second thread waits")
    release["first"].set()  # the first returns it and asks again at once
    wait_until(lambda: len(got) == 2, what="the connection changes hands")
    assert got == ["first", "waiter"]
    wait_until(lambda: sum(pool.fair.waiting().values()) == 1, what="the first queues")
    release["waiter"].set()
    release["again"].set()
    for thread in threads:
        thread.join(60)
    assert got == ["first", "waiter", "again"] and errors == []


def test_work_conserving_one_source_uses_the_whole_cap(
    manager: EngineManager, holders: Callable[[DatabaseSpec], Holders]
) -> None:
    database = spec(1506)
    fair = fair_queue(manager, database)
    run = holders(database)
    run.start("SQL_LAB", 5)
    wait_until(lambda: fair.checked_out()["SQL_LAB"] == 4, what="SQL Lab holds all 4")
    wait_until(lambda: fair.waiting()["SQL_LAB"] == 1, what="the fifth waits")
    assert fair.checked_out()["DASHBOARD"] == 0
    run.release(0)  # its own returned connection goes to its own waiter
    wait_until(lambda: len(run.got) == 5, what="the fifth gets a connection")
    assert fair.checked_out()["SQL_LAB"] == 4 and run.errors == []


def test_an_active_sources_share_stays_free_for_it(
    manager: EngineManager, holders: Callable[[DatabaseSpec], Holders]
) -> None:
    """Dashboards between two queries keep their share: SQL Lab does not fill the pool."""
    database = spec(1509)
    fair = fair_queue(manager, database)
    run = holders(database)
    run.start("DASHBOARD", 1)  # dashboards are active: they hold a connection
    wait_until(lambda: fair.checked_out()["DASHBOARD"] == 1, what="a dashboard holds one")
    run.start("SQL_LAB", 4)
    wait_until(lambda: fair.waiting()["SQL_LAB"] == 3, what="SQL Lab waits beyond its share")
    assert fair.checked_out()["SQL_LAB"] == 1  # two connections stay free for the dashboards
    run.start("DASHBOARD", 2)
    wait_until(lambda: fair.checked_out()["DASHBOARD"] == 3, what="dashboards get their share")
    assert fair.waiting() == {"*": 0, "DASHBOARD": 0, "SQL_LAB": 3}
    for index in (0, 5, 6):  # the dashboards go idle: SQL Lab may use the whole cap
        run.release(index)
    wait_until(lambda: fair.checked_out()["SQL_LAB"] == 4, what="SQL Lab takes the whole cap")
    assert run.errors == []


def test_unnamed_sources_share_the_star_entry(
    manager: EngineManager, holders: Callable[[DatabaseSpec], Holders]
) -> None:
    database = spec(1507, shares={"DASHBOARD": 1, "*": 1})
    fair = fair_queue(manager, database)
    run = holders(database)
    run.start("CHART", 2)
    wait_until(lambda: fair.checked_out()["*"] == 2, what="CHART counts as *")
    with manager.connect(database) as connection:  # no source at all: * too
        assert connection.execute(text("SELECT 1")).scalar() == 1
        assert fair.checked_out()["*"] == 3


def test_a_sources_own_pool_timeout_names_database_and_source(
    manager: EngineManager, holders: Callable[[DatabaseSpec], Holders]
) -> None:
    database = spec(1508, shares={"DASHBOARD": {"weight": 3, "pool_timeout": 0.2}, "SQL_LAB": 1})
    fair = fair_queue(manager, database)
    run = holders(database)
    run.start("SQL_LAB", 4)
    wait_until(lambda: fair.checked_out()["SQL_LAB"] == 4, what="SQL Lab holds all 4")
    with pytest.raises(PoolExhaustedError) as info, manager.connect(database, source="DASHBOARD"):
        pass
    message = str(info.value)
    assert "database 1508" in message and "source DASHBOARD" in message
    assert "pool_timeout=0.2s" in message
    assert fair.waiting()["DASHBOARD"] == 0  # the timed-out waiter left the queue
    run.release(0)
    with manager.connect(database, source="DASHBOARD") as connection:  # still serves
        assert connection.execute(text("SELECT 1")).scalar() == 1


@pytest.mark.parametrize(
    ("shares", "field"),
    [
        ({"DASHBOARD": 0}, "extra.connection_shares.DASHBOARD"),
        ({"DASHBOARD": -1}, "extra.connection_shares.DASHBOARD"),
        ({"DASHBOARD": float("nan")}, "extra.connection_shares.DASHBOARD"),
        ({"DASHBOARD": float("inf")}, "extra.connection_shares.DASHBOARD"),
        ({"DASHBOARD": True}, "extra.connection_shares.DASHBOARD"),
        ({"DASHBOARD": "3"}, "extra.connection_shares.DASHBOARD"),
        ({"SQL_LAB": {"weight": 0}}, "extra.connection_shares.SQL_LAB.weight"),
        ({"SQL_LAB": {"pool_timeout": 5}}, "extra.connection_shares.SQL_LAB.weight"),
        ({"SQL_LAB": {"weight": 1, "pool_timeout": -1}},
         "extra.connection_shares.SQL_LAB.pool_timeout"),
        ({"SQL_LAB": {"weight": 1, "pool_timeout": float("inf")}},
         "extra.connection_shares.SQL_LAB.pool_timeout"),
        ({"SQL_LAB": {"weight": 1, "timeout": 5}}, "extra.connection_shares.SQL_LAB.timeout"),
        ({}, "extra.connection_shares"),
        ([1], "extra.connection_shares"),
    ],
)
def test_bad_shares_are_refused_naming_the_field(shares: Any, field: str) -> None:
    with pytest.raises(InvalidSpecError) as info:
        DatabaseSpec(id=1, uri=PG_URI, extra={"connection_shares": shares})
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_good_shares_are_accepted() -> None:
    database = DatabaseSpec(id=1, uri=PG_URI, extra={"connection_shares": {
        "DASHBOARD": {"weight": 2.5, "pool_timeout": 5}, "SQL_LAB": 1, "*": 0.5}})
    assert database.extra["connection_shares"]["*"] == 0.5
