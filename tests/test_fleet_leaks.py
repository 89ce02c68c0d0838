"""Permits are neither leaked nor lost (issue 13, items 1 and 9), against real Redis and PostgreSQL.

- A caller that gives up (its keeper too slow, or its pool_timeout passed)
  leaves no permit behind: the keeper never grants after the caller's deadline.
- Redis answering with an error that is no outage reaches the caller as our
  error naming the step, and its waiter is dequeued.
- A LeaseWaiter that dies is replaced: later waits work.
- A keeper that crashes while connections are held adopts their permits when
  it restarts: the cap holds (counted in pg_stat_activity).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any

import pykka
import pytest
import redis
from fleet_fixtures import (
    SHARED_REDIS,
    PgSampler,
    PrivateRedis,
    budget_of,
    free_port,
    lease_count,
    pg_spec_dict,
    unique,
    waiting_in,
)
from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.actors.lease_waiter import LeaseWaiter
from enginehouse.errors import EngineManagerError, FleetUnavailableError, PoolExhaustedError
from enginehouse.messages.budget import Attach


def spec(application_name: str, cap: int, **engine_params: Any) -> DatabaseSpec:
    return DatabaseSpec(**pg_spec_dict(unique("db"), application_name, cap, **engine_params))


def select_one(manager: EngineManager, database: DatabaseSpec) -> int:
    with manager.connect(database) as connection:
        return int(connection.execute(text("SELECT 1")).scalar_one())


class _Stall:
    """Looks like an engine to the keeper; reading its pool blocks until released.

    Attached to a budget, it holds the keeper inside one message: a keeper
    slower than any ask_timeout, with nothing mocked.
    """

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    @property
    def pool(self) -> None:
        self.entered.set()
        self.release.wait(60)
        return None


def stall_keeper(manager: EngineManager, database: DatabaseSpec) -> _Stall:
    stall = _Stall()
    keeper = manager._budgets._keeper()  # private: the only way to reach the keeper
    keeper.tell(Attach(f"db:{database.id}", 1, weakref.ref(stall), 1))
    assert stall.entered.wait(20), "the keeper never read the stalled engine"
    return stall


@pytest.fixture
def slow_ask_manager() -> Iterator[EngineManager]:
    with EngineManager(cleanup_interval=60, ask_timeout=5) as manager:
        yield manager


def test_a_caller_that_gives_up_on_a_slow_keeper_leaks_no_permit(
    slow_ask_manager: EngineManager, poll: Any
) -> None:
    manager = slow_ask_manager
    database = spec(unique("eh-leak"), 1, pool_timeout=1)
    assert select_one(manager, database) == 1
    manager.get(database).dispose()  # its connection closes: the next connect needs a permit
    poll(lambda: budget_of(manager, database).held == 0, what="the permit to come back")
    stall = _Stall()
    try:
        stall = stall_keeper(manager, database)
        with pytest.raises(EngineManagerError):  # the keeper is stuck beyond ask_timeout
            select_one(manager, database)
    finally:
        stall.release.set()
    # The keeper reads the abandoned ask only now, after the caller's deadline: no grant.
    assert budget_of(manager, database).held == 0
    assert budget_of(manager, database).timeouts >= 1
    assert select_one(manager, database) == 1  # the one permit is still there


def test_a_caller_leaving_at_its_deadline_leaves_no_waiter(poll: Any) -> None:
    with EngineManager(cleanup_interval=60, ask_timeout=10) as manager:
        database = spec(unique("eh-leak"), 1, pool_timeout=0.3, pool_size=2, max_overflow=0)
        held = manager.get(database).connect()
        try:
            other = manager.get(database, schema="pg_catalog")  # a second pool, same budget
            with pytest.raises(PoolExhaustedError):
                other.connect()
            poll(lambda: waiting_in(manager, database) == 0, what="the waiter to be dropped")
        finally:
            held.close()
        with other.connect() as connection:  # its permit came back to this budget
            assert connection.execute(text("SELECT 1")).scalar_one() == 1
        assert budget_of(manager, database).held >= 1


def test_redis_refusing_the_acquire_reaches_the_caller_as_our_error(
    private_redis: PrivateRedis, poll: Any
) -> None:
    settings = {"fleet_url": private_redis.url, "cleanup_interval": 60, "ask_timeout": 10,
                "fleet_lease_ttl": 120}
    admin = redis.Redis(port=private_redis.port)
    with EngineManager(**settings) as manager:
        database = spec(unique("eh-refused"), 2, pool_timeout=5)
        manager.get(database)  # the engine exists; Redis refuses writes from now on
        admin.replicaof("127.0.0.1", free_port())  # a read-only replica of nobody: READONLY
        try:
            with pytest.raises(FleetUnavailableError) as caught:
                select_one(manager, database)
            message = str(caught.value)
            assert "acquire" in message and ("READONLY" in message or "ReadOnly" in message)
            assert budget_of(manager, database).waiting == 0  # its waiter was dequeued
        finally:
            admin.replicaof("NO", "ONE")
        assert select_one(manager, database) == 1  # Redis accepts writes again: served
    admin.close()


def test_a_crashed_lease_waiter_is_replaced(fleet_prefix: str, poll: Any) -> None:
    settings = {"fleet_url": SHARED_REDIS, "fleet_prefix": fleet_prefix, "cleanup_interval": 60,
                "ask_timeout": 10, "fleet_lease_ttl": 120}
    with EngineManager(**settings) as holder, EngineManager(**settings) as waiter:
        database = spec(unique("eh-waiter"), 1, pool_timeout=4)
        held = holder.get(database).connect()
        result: list[object] = []
        thread = threading.Thread(target=lambda: result.append(select_one(waiter, database)))
        try:
            with pytest.raises(PoolExhaustedError):  # it waits in Redis through a LeaseWaiter
                select_one(waiter, database)
            (lease_waiter,) = pykka.ActorRegistry.get_by_class(LeaseWaiter)
            lease_waiter.tell("crash")  # an unexpected message: it dies (on_failure)
            poll(lambda: not lease_waiter.is_alive(), what="the LeaseWaiter to die")
            thread.start()
            poll(lambda: waiting_in(waiter, database) == 1, what="the second wait")
        finally:
            held.close()
            holder.get(database).dispose()  # the permit goes back to Redis: a waiter gets it
        thread.join(30)
        assert result == [1]  # a new LeaseWaiter brought the permit


@pytest.mark.parametrize("fleet", [False, True], ids=["embedded", "fleet"])
def test_a_crashed_keeper_keeps_the_cap(fleet_prefix: str, fleet: bool, poll: Any) -> None:
    """Two managers of one database, cap 2: one holds both, its keeper crashes and restarts."""
    settings: dict[str, Any] = {"cleanup_interval": 60, "ask_timeout": 10}
    if fleet:  # a short TTL: without adoption, the crashed keeper's leases expire at once
        settings.update(fleet_url=SHARED_REDIS, fleet_prefix=fleet_prefix, fleet_lease_ttl=2.0,
                        cleanup_interval=0.5)
    app = unique("eh-crash")
    database = spec(app, 2, pool_timeout=4, pool_size=2, max_overflow=0)
    with EngineManager(**settings) as left, EngineManager(**settings) as right, PgSampler(
        app
    ) as sampler:
        held = [left.get(database).connect() for _ in range(2)]
        keeper = left._budgets._keeper()  # private: the only way to reach one keeper
        keeper.tell("crash")  # an unexpected message: on_failure, the supervisor restarts it
        poll(lambda: not keeper.is_alive(), what="left's keeper to die")
        poll(lambda: budget_of(left, database).held == 2, what="the restarted keeper to adopt")
        if fleet:
            poll(lambda: lease_count(SHARED_REDIS, fleet_prefix, f"db:{database.id}") == 2,
                 what="Redis to list both permits")
        with pytest.raises(PoolExhaustedError):  # both permits are still left's
            select_one(right, database)
        for connection in held:
            connection.close()
        left.get(database).dispose()  # left's connections close: their permits come back
        assert select_one(right, database) == 1
    assert 1 <= sampler.peak <= 2, sampler.peak


def test_a_crashed_keeper_leaves_no_lease_waiter_behind(fleet_prefix: str, poll: Any) -> None:
    settings = {"fleet_url": SHARED_REDIS, "fleet_prefix": fleet_prefix, "cleanup_interval": 60,
                "ask_timeout": 10, "fleet_lease_ttl": 120}
    with EngineManager(**settings) as holder, EngineManager(**settings) as waiter:
        database = spec(unique("eh-waiter"), 1, pool_timeout=0.5)
        # it waited through a LeaseWaiter:
        with holder.get(database).connect(), pytest.raises(PoolExhaustedError):
            select_one(waiter, database)
        (lease_waiter,) = pykka.ActorRegistry.get_by_class(LeaseWaiter)
        # Its blocking wait (5 s) ends; nobody waits any more: it idles, alive.
        poll(lambda: budget_of(waiter, database).blocking_waits >= 1, what="the wait to end")
        assert lease_waiter.is_alive()
        keeper = waiter._budgets._keeper()  # private: the only way to reach the keeper
        keeper.tell("crash")  # an unexpected message: on_failure, the supervisor restarts it
        poll(lambda: not lease_waiter.is_alive(), what="the crashed keeper's LeaseWaiter to stop")
