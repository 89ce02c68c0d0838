"""Fair shares follow demand, signalled through Redis, not the Janitor's timer (issue 14).

The Janitor's period is 60 s here, longer than any wait of these tests: a
holder gives connections back only because it heard, through Redis pub/sub,
that another process started waiting.
"""

from __future__ import annotations

import threading
from typing import Any

import pykka
import pytest
import redis
from fleet_fixtures import SHARED_REDIS, PgSampler, budget_of, pg_spec_dict, unique, waiting_in
from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager, fleet
from enginehouse.actors.demand_listener import DemandListener

pytestmark = pytest.mark.services("postgres", "redis")

SLOW_ROUNDS = {"cleanup_interval": 60, "fleet_lease_ttl": 120, "ask_timeout": 10}


def test_a_holder_gives_back_beyond_its_share_when_another_starts_waiting(
    fleet_prefix: str, poll: Any
) -> None:
    app = unique("eh-demand")
    database = DatabaseSpec(**pg_spec_dict(unique("db"), app, 4, pool_size=4, pool_timeout=20))
    settings = {"fleet_url": SHARED_REDIS, "fleet_prefix": fleet_prefix, **SLOW_ROUNDS}
    with EngineManager(**settings) as early, EngineManager(**settings) as late, PgSampler(
        app
    ) as sampler:
        held = [early.get(database).connect() for _ in range(4)]  # the whole cap, then idle
        for connection in held:
            connection.close()
        assert budget_of(early, database).held == 4
        got: list[int] = []

        def work() -> None:
            with late.connect(database) as connection:
                got.append(int(connection.execute(text("SELECT 1")).scalar_one()))

        threads = [threading.Thread(target=work) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert got == [1, 1]  # served long before the Janitor's first round (60 s)
        assert budget_of(early, database).demand_news >= 1
        assert budget_of(early, database).held <= 2  # down to its share of 4 between two
        poll(lambda: waiting_in(late, database) == 0, what="the late manager to stop waiting")
    assert sampler.peak <= 4, sampler.peak


def test_shutdown_ends_the_demand_listener_at_once(fleet_prefix: str, poll: Any) -> None:
    """Its read blocks up to 5 s in Redis; shutdown interrupts it instead of waiting it out."""
    before = set(pykka.ActorRegistry.get_by_class(DemandListener))
    threads_before = {t for t in threading.enumerate() if t.name.startswith("DemandListener")}
    manager = EngineManager(fleet_url=SHARED_REDIS, fleet_prefix=fleet_prefix, **SLOW_ROUNDS)
    database = DatabaseSpec(**pg_spec_dict(unique("db"), unique("eh-listener"), 2))
    with manager.connect(database) as connection:  # the keeper (and its listener) run
        assert connection.execute(text("SELECT 1")).scalar_one() == 1
    (listener,) = set(pykka.ActorRegistry.get_by_class(DemandListener)) - before
    assert listener.is_alive()
    manager.shutdown()
    assert not listener.is_alive()  # stopped before shutdown returned, not up to 5 s later
    poll(
        lambda: not {t for t in threading.enumerate() if t.name.startswith("DemandListener")}
        - threads_before,
        what="the DemandListener thread to end",
    )


def test_shares_by_source_hold_across_the_fleet(fleet_prefix: str, poll: Any) -> None:
    """SQL Lab in one manager, dashboards in another, one fleet cap of 4 (issue 15).

    Each has its own keeper (a process of the fleet, to Redis). Split by
    processes, the dashboards would get 2 of the 4; weighted by the sources
    each process serves (DASHBOARD 3, SQL_LAB 1) they get 3.
    """
    app = unique("eh-fleet-shares")
    params = pg_spec_dict(unique("db"), app, 4, pool_size=4, pool_timeout=60)
    params["extra"]["connection_shares"] = {"DASHBOARD": 3, "SQL_LAB": 1}
    database = DatabaseSpec(**params)
    settings = {"fleet_url": SHARED_REDIS, "fleet_prefix": fleet_prefix, **SLOW_ROUNDS}
    stop, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def sql_lab(manager: EngineManager) -> None:  # short queries back to back: check-ins
        try:
            while not stop.is_set():
                with manager.connect(database, source="SQL_LAB") as connection:
                    connection.execute(text("SELECT pg_sleep(0.02)"))
        except BaseException as exc:
            errors.append(exc)

    def dashboard(manager: EngineManager) -> None:  # holds its connection until released
        try:
            with manager.connect(database, source="DASHBOARD") as connection:
                connection.execute(text("SELECT 1"))
                release.wait(60)
        except BaseException as exc:
            errors.append(exc)

    with EngineManager(**settings) as lab, EngineManager(**settings) as board, PgSampler(
        app
    ) as sampler:
        threads = [threading.Thread(target=sql_lab, args=(lab,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        poll(lambda: budget_of(lab, database).held == 4, what="SQL Lab to hold the whole cap")
        dashboards = [threading.Thread(target=dashboard, args=(board,)) for _ in range(4)]
        for thread in dashboards:
            thread.start()
        fair = board.get(database).pool.fair
        poll(lambda: fair.checked_out()["DASHBOARD"] == 3, what="dashboards to get 3 of 4")
        poll(lambda: budget_of(lab, database).held <= 1, what="SQL Lab down to its share")
        assert fair.waiting()["DASHBOARD"] == 1  # the fourth waits: 3 is the weighted share
        release.set()
        stop.set()
        for thread in threads + dashboards:
            thread.join(60)
    assert errors == []
    assert sampler.peak <= 4, sampler.peak


def test_a_process_share_follows_the_weights_of_the_sources_it_serves(fleet_prefix: str) -> None:
    """The renewal's arithmetic, on real Redis: each source's weight is split evenly
    among the processes serving it; a process without sources serves "*" (weight 1)."""
    stores = {
        name: fleet.LeaseStore(SHARED_REDIS, prefix=fleet_prefix, process=name, timeout=1.0)
        for name in ("a", "b", "c")
    }
    try:
        def shares(cap: int, demands: dict[str, dict[str, float]]) -> dict[str, int]:
            for name in demands:  # everyone waits: all count, the last renewals see all
                stores[name].renew("db:w", cap, 30.0, 0, True, 0, demands[name])
            return {
                name: stores[name].renew("db:w", cap, 30.0, 0, True, 0, demands[name]).share(cap)
                for name in demands
            }

        # SQL Lab in a, dashboards and SQL Lab in b: a gets half of SQL Lab's weight.
        assert shares(8, {"a": {"SQL_LAB": 1}, "b": {"DASHBOARD": 3, "SQL_LAB": 1}}) == {
            "a": 1, "b": 7}
        assert shares(4, {"a": {"SQL_LAB": 1}, "b": {"DASHBOARD": 3}}) == {"a": 1, "b": 3}
        # No shares anywhere: cap / processes, the first by name getting the remainder.
        assert shares(8, {"a": {}, "b": {}, "c": {}}) == {"a": 3, "b": 3, "c": 2}
    finally:
        for store in stores.values():
            store.close()


def _blocked_in_redis() -> int:
    """Clients blocked in BLMOVE on the shared Redis (LeaseWaiters waiting for a permit)."""
    client = redis.Redis.from_url(SHARED_REDIS)
    try:
        return sum(1 for c in client.client_list() if c.get("cmd") == "blmove")
    finally:
        client.close()


def test_a_process_that_starts_waiting_gets_its_share_while_the_holder_stays_busy(
    fleet_prefix: str, poll: Any
) -> None:
    """The holder's own wait in Redis must not catch back the permit it owes.

    ``busy`` holds 3 of 4 and has a caller of its own waiting in Redis (its pool grew
    while the cap was its own); then ``late`` starts waiting, so ``busy``'s share is 2.
    The permit ``busy`` gives back when one of its connections comes in went to the
    longest wait in Redis, its own: it kept 3 and ``late`` waited until ``busy``'s
    next renewal (the Janitor's, 60 s here; 20 s waits in bench_shares --fleet).
    """
    app = unique("eh-demand")
    database = DatabaseSpec(**pg_spec_dict(unique("db"), app, 4, pool_size=4, pool_timeout=20))
    settings = {"fleet_url": SHARED_REDIS, "fleet_prefix": fleet_prefix, **SLOW_ROUNDS}
    done = [threading.Event() for _ in range(5)]  # one per held connection: let it go
    got: list[str] = []
    errors: list[BaseException] = []

    def hold(manager: EngineManager, name: str, until: threading.Event) -> None:
        try:
            with manager.connect(database) as connection:
                connection.execute(text("SELECT 1"))
                got.append(name)
                until.wait(60)
        except BaseException as exc:
            errors.append(exc)

    with EngineManager(**settings) as busy, EngineManager(**settings) as late, PgSampler(
        app
    ) as sampler:
        threads = [threading.Thread(target=hold, args=(late, "late0", done[0]))]
        threads += [
            threading.Thread(target=hold, args=(busy, f"busy{i}", done[i])) for i in (1, 2, 3)
        ]
        for count, thread in enumerate(threads, 1):  # late first: busy then holds 3 of 4
            thread.start()
            poll(lambda n=count: len(got) == n, what="the connections to be held")
        blocked = _blocked_in_redis()
        threads.append(threading.Thread(target=hold, args=(busy, "busy4", done[4])))
        threads[-1].start()  # the fleet is full: busy's own caller waits in Redis
        poll(lambda: waiting_in(busy, database) == 1, what="busy's own caller to wait")
        poll(lambda: _blocked_in_redis() > blocked, what="busy's wait in Redis")
        threads.append(threading.Thread(target=hold, args=(late, "late1", done[0])))
        threads[-1].start()  # late starts waiting: busy's share drops to 2
        poll(lambda: budget_of(busy, database).fleet_waiting == 1, what="busy to hear of it")
        done[1].set()  # one of busy's connections comes in: the one it owes
        poll(lambda: "late1" in got or errors, timeout=40, what="late's second connection")
        assert errors == []
        assert threads[2].is_alive() and threads[3].is_alive()  # busy's threads still hold
        for event in done:
            event.set()
        for thread in threads:
            thread.join(60)
    assert errors == []
    assert sampler.peak <= 4, sampler.peak
