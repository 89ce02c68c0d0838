"""Fleet budgets: the cap holds across processes through leases in Redis (issue 5).

Real Redis (the shared one with a per-test key prefix, or a private one for
outages) and real PostgreSQL; connections are counted in pg_stat_activity by
application_name while the load runs.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fleet_fixtures import (
    SHARED_REDIS,
    PgSampler,
    PrivateRedis,
    budget_of,
    lease_count,
    leases_by_process,
    pg_spec_dict,
    start_worker,
    unique,
    waiting_in,
    worker_result,
)
from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.errors import FleetUnavailableError

pytestmark = pytest.mark.services("postgres", "redis")

# Short rounds so that rebalancing and recovery happen within a test (production: 30 s).
# A lease must outlive the longest stall of its process's renewals: under a load of
# several processes starting at once on 2 cores, 2 s is not always enough, so only the
# quiet SIGKILL and outage tests use it.
FAST = {"cleanup_interval": 0.5, "fleet_lease_ttl": 10.0, "ask_timeout": 10}
SHORT_TTL = {"fleet_lease_ttl": 2.0}


def settings(url: str, prefix: str, **more: Any) -> dict[str, Any]:
    return {"fleet_url": url, "fleet_prefix": prefix, **FAST, **more}



def test_four_processes_of_eight_threads_never_exceed_the_cap(fleet_prefix: str) -> None:
    app = unique("eh-fleet")
    spec = pg_spec_dict(unique("db"), app, 6, pool_timeout=60)
    config = {
        "action": "load",
        "threads": 8,
        "queries": 30,
        "sql": "SELECT pg_sleep(0.003)",
        "spec": spec,
        "settings": settings(SHARED_REDIS, fleet_prefix),
    }
    with PgSampler(app) as sampler:
        workers = [start_worker(config) for _ in range(4)]
        results = [worker_result(worker) for worker in workers]
    assert [r["errors"] for r in results] == [0, 0, 0, 0], [r["first_errors"] for r in results]
    assert [r["queries"] for r in results] == [8 * 30] * 4  # all queries completed
    assert len(sampler.samples) > 20
    assert 1 <= sampler.peak <= 6, sampler.peak
    for result in results:
        (budget,) = result["budgets"]
        assert budget["mode"] == "fleet" and budget["cap"] == 6
        assert budget["fleet_held"] is not None and budget["fleet_held"] <= 6


def test_sigkilled_holder_loses_its_leases_after_the_ttl(fleet_prefix: str, poll: Any) -> None:
    app = unique("eh-fleet")
    spec = pg_spec_dict(unique("db"), app, 3, pool_timeout=30)
    config = {"action": "hold", "hold": 3, "spec": spec}
    holder = start_worker({**config, "settings": settings(SHARED_REDIS, fleet_prefix, **SHORT_TTL)})
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "READY"
        budget = f"db:{spec['id']}"
        held = leases_by_process(SHARED_REDIS, fleet_prefix, budget)
        assert list(held.values()) == [3]
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            holder.kill()
    database = DatabaseSpec(**spec)
    with EngineManager(**settings(SHARED_REDIS, fleet_prefix, **SHORT_TTL)) as manager:
        engine = manager.get(database)
        # Each connect waits (FIFO, pool_timeout 30 s) until the dead process's leases expire.
        connections = [engine.connect() for _ in range(3)]
        try:
            assert all(c.execute(text("SELECT 1")).scalar() == 1 for c in connections)
            now_held = leases_by_process(SHARED_REDIS, fleet_prefix, budget)
            assert list(now_held.values()) == [3] and not set(now_held) & set(held)
            assert PgSampler(app).now() == 3
        finally:
            for connection in connections:
                connection.close()


@pytest.fixture
def outage_manager(
    private_redis: PrivateRedis, request: pytest.FixtureRequest
) -> Iterator[tuple[EngineManager, DatabaseSpec, str]]:
    app = unique("eh-fleet")
    database = DatabaseSpec(**pg_spec_dict(unique("db"), app, 3, pool_timeout=5))
    values = settings(
        private_redis.url, unique("eh-outage"), fleet_fallback=request.param, **SHORT_TTL
    )
    with EngineManager(**values) as manager:
        yield manager, database, values["fleet_prefix"]


@pytest.mark.parametrize("outage_manager", ["closed"], indirect=True)
def test_redis_outage_fails_closed_then_recovers(
    outage_manager: tuple[EngineManager, DatabaseSpec, str],
    private_redis: PrivateRedis,
    poll: Any,
) -> None:
    manager, database, prefix = outage_manager
    with manager.connect(database) as connection:
        assert connection.execute(text("SELECT 1")).scalar() == 1
    private_redis.stop()
    other = manager.get(database, schema="information_schema")  # needs a new connection
    with pytest.raises(FleetUnavailableError, match="fleet_fallback='closed'"), other.connect():
        pass
    assert budget_of(manager, database).mode == "fleet-down"
    private_redis.start()  # empty: no persistence, every lease is gone

    def connects() -> bool:
        try:
            with other.connect() as connection:
                return connection.execute(text("SELECT 1")).scalar() == 1
        except FleetUnavailableError:
            return False

    poll(connects, timeout=30, what="new connections after Redis returned")
    budget = f"db:{database.id}"
    poll(lambda: budget_of(manager, database).mode == "fleet", what="fleet mode again")
    # Reconciled: every connection this process holds has a lease in the new Redis.
    poll(
        lambda: lease_count(private_redis.url, prefix, budget)
        == budget_of(manager, database).held,
        what="leases re-registered",
    )
    assert budget_of(manager, database).held <= 3


@pytest.mark.parametrize("outage_manager", ["local"], indirect=True)
def test_redis_outage_with_local_fallback_keeps_serving(
    outage_manager: tuple[EngineManager, DatabaseSpec, str],
    private_redis: PrivateRedis,
    poll: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager, database, prefix = outage_manager
    engine = manager.get(database)
    stop = threading.Event()
    failures: list[str] = []
    done: list[int] = []

    def load() -> None:
        count = 0
        while not stop.is_set():
            try:
                with engine.connect() as connection:
                    connection.execute(text("SELECT pg_sleep(0.002)"))
                count += 1
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
        done.append(count)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        poll(lambda: budget_of(manager, database).held >= 1, what="load running")
        with caplog.at_level(logging.WARNING, logger="enginehouse.budget"):
            private_redis.stop()
            poll(
                lambda: budget_of(manager, database).mode == "fleet-fallback",
                what="the outage noticed",
            )
            other = manager.get(database, schema="information_schema")
            with other.connect() as connection:  # a new connection, under the local share
                assert connection.execute(text("SELECT 1")).scalar() == 1
        assert any("fleet_fallback='local'" in r.getMessage() for r in caplog.records)
        private_redis.start()
        poll(lambda: budget_of(manager, database).mode == "fleet", what="fleet mode again")
        budget = f"db:{database.id}"
        poll(
            lambda: 0 < lease_count(private_redis.url, prefix, budget) <= 3,
            what="leases reconciled into the restarted Redis",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert failures == []
    assert all(count > 0 for count in done)
    assert budget_of(manager, database).held <= 3


def _forked_child(
    manager: EngineManager, spec: dict[str, Any], results: Any, index: int
) -> None:
    database = DatabaseSpec(**spec)
    errors: list[str] = []

    def work() -> None:
        for _ in range(20):
            try:
                with manager.connect(database) as connection:
                    connection.execute(text("SELECT pg_sleep(0.002)"))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held = [b.model_dump() for b in manager.stats().budgets]
    manager.shutdown()  # gives this child's leases back
    results.put((index, errors, held))


def test_fork_after_use_keeps_the_budget(fleet_prefix: str) -> None:
    app = unique("eh-fleet")
    spec = pg_spec_dict(unique("db"), app, 4, pool_timeout=60)
    database = DatabaseSpec(**spec)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    with EngineManager(**settings(SHARED_REDIS, fleet_prefix)) as manager:
        engine = manager.get(database)
        held = [engine.connect() for _ in range(2)]  # used before the fork, kept open
        for connection in held:
            connection.execute(text("SELECT 1"))
        with PgSampler(app) as sampler:
            children = [
                context.Process(target=_forked_child, args=(manager, spec, results, i))
                for i in range(3)
            ]
            for child in children:
                child.start()
            outcomes = sorted(results.get(timeout=120) for _ in children)
            for child in children:
                child.join(timeout=60)
        assert [child.exitcode for child in children] == [0, 0, 0]
        assert [errors for _, errors, _ in outcomes] == [[], [], []], outcomes
        assert 1 <= sampler.peak <= 4, sampler.peak
        # The parent's connections survived its children and still hold their leases.
        assert all(c.execute(text("SELECT 2")).scalar() == 2 for c in held)
        assert budget_of(manager, database).held == 2
        for connection in held:
            connection.close()


def test_a_waiting_process_is_woken_without_polling(fleet_prefix: str, poll: Any) -> None:
    """A caller waits in Redis (BLMOVE), not in a retry loop: its wait costs the same
    two round trips (the refused ask, the wait that brings the permit) however long it is."""
    app = unique("eh-fleet")
    database = DatabaseSpec(**pg_spec_dict(unique("db"), app, 1, pool_timeout=30))
    values = settings(SHARED_REDIS, fleet_prefix, cleanup_interval=30, fleet_lease_ttl=90)
    with EngineManager(**values) as holder, EngineManager(**values) as waiter:
        held = holder.get(database).connect()
        got: list[int] = []
        caller = threading.Thread(
            target=lambda: got.append(_select_one(waiter, database)), daemon=True
        )
        caller.start()
        poll(lambda: waiting_in(waiter, database) == 1, what="the caller to wait")
        # Long enough for a poller to have asked Redis many times (it used to every 20-500 ms).
        caller.join(timeout=1.5)
        assert not got and budget_of(waiter, database).acquire_round_trips == 1
        held.invalidate()  # the holder's connection closes: its permit goes back to Redis
        held.close()
        caller.join(timeout=30)
        assert got == [1]
        stats = budget_of(waiter, database)
        assert stats.acquire_round_trips == 2 and stats.held == 1
        assert budget_of(holder, database).release_round_trips == 1


def _select_one(manager: EngineManager, database: DatabaseSpec, **where: str) -> int:
    with manager.connect(database, **where) as connection:
        return int(connection.execute(text("SELECT 1")).scalar_one())


def test_a_late_reply_is_not_an_outage(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture, poll: Any
) -> None:
    """Redis stalls once for longer than the socket timeout (DEBUG SLEEP): the keeper
    asks again instead of failing closed, and new connections keep coming."""
    import redis

    database = DatabaseSpec(**pg_spec_dict(unique("db"), unique("eh-fleet"), 3, pool_timeout=10))
    values = settings(private_redis.url, unique("eh-late"), ask_timeout=2)  # 0.5 s socket timeout
    caplog.set_level(logging.WARNING, logger="enginehouse.budget")
    with EngineManager(**values) as manager:
        assert _select_one(manager, database) == 1
        other = manager.get(database, schema="information_schema").connect()
        staller = redis.Redis(port=private_redis.port)
        connection = staller.connection_pool.make_connection()  # redis-py 5 and 8 alike
        try:
            connection.send_command("DEBUG", "SLEEP", "0.8")  # Redis answers nobody for 0.8 s
            other.invalidate()  # its permit goes back: a GIVE while Redis sleeps
            other.close()
            poll(lambda: "answered late" in caplog.text, what="the keeper to ask again")
            connection.read_response()
        finally:
            connection.disconnect()
            staller.close()
        assert budget_of(manager, database).mode == "fleet"
        assert _select_one(manager, database, schema="pg_catalog") == 1
    assert "unreachable" not in caplog.text


def test_a_dropped_blocking_wait_is_not_an_outage(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture, poll: Any
) -> None:
    """Redis drops the connection a caller waits on (CLIENT KILL) while it still answers:
    the keeper waits again instead of failing closed, and the caller gets the permit."""
    import redis

    database = DatabaseSpec(**pg_spec_dict(unique("db"), unique("eh-fleet"), 1, pool_timeout=20))
    values = settings(private_redis.url, unique("eh-drop"), cleanup_interval=30, fleet_lease_ttl=90)
    caplog.set_level(logging.WARNING, logger="enginehouse.budget")
    admin = redis.Redis(port=private_redis.port, decode_responses=True)
    with EngineManager(**values) as holder, EngineManager(**values) as waiter:
        held = holder.get(database).connect()
        got: list[int] = []
        caller = threading.Thread(target=lambda: got.append(_select_one(waiter, database)))
        caller.start()

        def blocked() -> list[str]:
            return [c["id"] for c in admin.client_list() if c.get("cmd") == "blmove"]

        poll(blocked, what="the caller's wait to block in Redis")
        for client_id in blocked():
            admin.client_kill_filter(_id=client_id)
        poll(lambda: "dropped a call" in caplog.text, what="the keeper to notice")
        held.invalidate()  # the permit goes back: the caller's new wait gets it
        held.close()
        caller.join(timeout=30)
        assert got == [1]
        assert budget_of(waiter, database).mode == "fleet"
    admin.close()
    assert "unreachable" not in caplog.text
