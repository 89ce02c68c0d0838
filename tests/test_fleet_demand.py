"""Fair shares follow demand, signalled through Redis, not the Janitor's timer (issue 14).

The Janitor's period is 60 s here, longer than any wait of these tests: a
holder gives connections back only because it heard, through Redis pub/sub,
that another process started waiting.
"""

from __future__ import annotations

import threading
from typing import Any

import pykka
from fleet_fixtures import SHARED_REDIS, PgSampler, budget_of, pg_spec_dict, unique, waiting_in
from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.actors.demand_listener import DemandListener

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
