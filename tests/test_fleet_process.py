"""Embedded budgets are per process, not per manager (issue 5).

Two EngineManagers in one process (say a Flask extension's and the default
``engines``) draw on one cap per database: the keepers share permit tokens
through the process's ledger and give back beyond their share when the other
waits. Real PostgreSQL; connections are counted in pg_stat_activity.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pykka
import pytest
from fleet_fixtures import PgSampler, budget_of, pg_spec_dict, unique, waiting_in
from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager

pytestmark = pytest.mark.services("postgres")

SETTINGS = {"cleanup_interval": 60, "ask_timeout": 10}


@pytest.fixture
def two_managers() -> Iterator[tuple[EngineManager, EngineManager]]:
    with EngineManager(**SETTINGS) as left, EngineManager(**SETTINGS) as right:
        yield left, right


def spec(application_name: str, cap: int, **engine_params: Any) -> DatabaseSpec:
    return DatabaseSpec(**pg_spec_dict(unique("db"), application_name, cap, **engine_params))


def select_one(manager: EngineManager, database: DatabaseSpec, **where: str) -> int:
    with manager.connect(database, **where) as connection:
        return int(connection.execute(text("SELECT 1")).scalar_one())


def test_the_cap_holds_across_two_managers_under_load(
    two_managers: tuple[EngineManager, EngineManager],
) -> None:
    """6 threads per manager, cap 3 for the database: never more than 3 connections."""
    app = unique("eh-process")
    database = spec(app, 3, pool_size=5, max_overflow=5)
    done: dict[int, list[int]] = {0: [], 1: []}

    def work(side: int) -> None:
        manager = two_managers[side]
        count = 0
        for _ in range(20):
            with manager.connect(database) as connection:
                connection.execute(text("SELECT pg_sleep(0.002)"))
            count += 1
        done[side].append(count)

    threads = [threading.Thread(target=work, args=(i % 2,)) for i in range(12)]
    with PgSampler(app) as sampler:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert done == {0: [20] * 6, 1: [20] * 6}  # both managers got through, no timeout
    assert len(sampler.samples) > 10
    assert 1 <= sampler.peak <= 3
    held = [budget_of(m, database).held for m in two_managers]
    assert sum(held) <= 3


def test_idle_connections_of_one_manager_serve_the_other(
    two_managers: tuple[EngineManager, EngineManager],
) -> None:
    left, right = two_managers
    app = unique("eh-process")
    database = spec(app, 2, pool_timeout=10)
    engine = left.get(database)
    connections = [engine.connect() for _ in range(2)]
    for connection in connections:
        connection.close()  # idle in left's pool, still holding both permits
    sampler = PgSampler(app)
    assert sampler.now() == 2
    assert select_one(right, database) == 1  # left closed an idle one for it
    assert sampler.now() <= 2
    assert budget_of(left, database).shed >= 1


def test_a_waiter_of_one_manager_gets_the_next_connection_the_other_closes(
    two_managers: tuple[EngineManager, EngineManager], poll: Any
) -> None:
    left, right = two_managers
    app = unique("eh-process")
    database = spec(app, 2, pool_timeout=30)
    busy = [left.get(database).connect() for _ in range(2)]  # checked out: nothing idle
    got: list[int] = []
    caller = threading.Thread(target=lambda: got.append(select_one(right, database)))
    caller.start()
    poll(lambda: waiting_in(right, database) == 1, what="right's caller to wait")
    assert PgSampler(app).now() == 2 and not got
    busy[0].close()  # back to left's pool, but left is over its share: it closes instead
    caller.join(timeout=30)
    assert got == [1]
    assert PgSampler(app).now() <= 2
    busy[1].close()


def test_managers_of_different_prefixes_do_not_share() -> None:
    app = unique("eh-process")
    database = spec(app, 1, pool_timeout=10)
    with EngineManager(**SETTINGS, fleet_prefix=unique("a")) as one, EngineManager(
        **SETTINGS, fleet_prefix=unique("b")
    ) as other, one.connect(database), other.connect(database):
        assert PgSampler(app).now() == 2


def test_a_crashed_keepers_idle_permit_goes_to_a_waiter(
    two_managers: tuple[EngineManager, EngineManager], poll: Any
) -> None:
    """A keeper that dies does not starve the rest, nor lose the permit of its idle connection."""
    left, right = two_managers
    app = unique("eh-process")
    database = spec(app, 1, pool_timeout=10)
    with left.connect(database) as connection:
        connection.execute(text("SELECT 1"))
    left_keeper = left._budgets._keeper()  # private: the only way to reach one keeper
    assert left_keeper in pykka.ActorRegistry.get_by_class_name("BudgetKeeper")
    left_keeper.tell("crash")  # an unexpected message: on_failure, the supervisor restarts it
    poll(lambda: not left_keeper.is_alive(), what="left's keeper to die")
    # left's idle connection still exists; its restarted keeper adopted the permit and gives
    # it back when right waits (it closes the idle connection): the cap of 1 holds.
    with PgSampler(app) as sampler:
        assert select_one(right, database) == 1
    assert sampler.peak <= 1, sampler.peak
