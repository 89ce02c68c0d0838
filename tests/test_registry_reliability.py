"""Issue 13 items 3 and 4: the registry never loses an engine nor a connection (real PostgreSQL).

Each test names its connections with a unique ``application_name`` and counts
them in ``pg_stat_activity``: a connection the registry lost track of shows up
there after it should be gone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pykka
import pytest
from conftest import PG_URI, wait_until
from fleet_fixtures import PgSampler, unique
from sqlalchemy import text
from sqlalchemy.engine import Connection

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.actors.registry import EngineRegistry, Snapshot
from enginehouse.errors import EngineCreationError
from enginehouse.messages.registry import DisposeDatabase, GetEngine, Sweep
from enginehouse.plan import build_plan, request_key
from enginehouse.settings import ManagerSettings

TIMEOUT = 10.0
SETTINGS = ManagerSettings.build(mode="singleton")


def pg(database_id: int | str, app: str, **engine_params: Any) -> DatabaseSpec:
    params = {"connect_args": {"application_name": app}, **engine_params}
    return DatabaseSpec(id=database_id, uri=PG_URI, extra={"engine_params": params})


def server_connections_drop_to(app: str, count: int) -> None:
    sampler = PgSampler(app)
    wait_until(lambda: sampler.now() == count, what=f"{count} server connections of {app}")


def select_one(conn: Connection) -> None:
    assert conn.execute(text("select 1")).scalar() == 1


@pytest.fixture
def registry() -> Iterator[tuple[pykka.ActorRef[Any], Snapshot]]:
    snapshot = Snapshot()
    ref = EngineRegistry.start(snapshot, max_engines=1)
    yield ref, snapshot
    if ref.is_alive():
        ref.stop()


def get(ref: pykka.ActorRef[Any], spec: DatabaseSpec) -> Any:
    key = request_key(spec, SETTINGS, catalog=None, schema=None, user=None, source=None)
    return key, ref.ask(GetEngine(key, build_plan(spec, key, SETTINGS)), timeout=TIMEOUT)


# -- item 3: a failed spec change orphans nothing ----------------------------------------


def test_failed_spec_change_keeps_the_old_engine_owned_until_shutdown() -> None:
    app = unique("eh-respec")
    old = pg("respec", app)
    broken = pg("respec", app, no_such_argument=1)  # valid spec, create_engine refuses it
    manager = EngineManager(cleanup_interval=60, ask_timeout=TIMEOUT)
    try:
        engine = manager.get(old)
        with engine.connect() as conn:
            select_one(conn)
        with pytest.raises(EngineCreationError):
            manager.get(broken)
        assert manager.stats().engine_count == 1  # still owned, not disposed behind our back
        assert manager.get(old) is engine
        with manager.connect(old) as conn:
            select_one(conn)
    finally:
        manager.shutdown()
    server_connections_drop_to(app, 0)


def test_spec_change_that_builds_retires_the_old_engine() -> None:
    app = unique("eh-respec-ok")
    with EngineManager(cleanup_interval=60, ask_timeout=TIMEOUT) as manager:
        first = manager.get(pg("respec-ok", app))
        with first.connect() as conn:
            select_one(conn)
        second = manager.get(pg("respec-ok", app, pool_size=2))
        assert second is not first
        assert manager.stats().engine_count == 1
        server_connections_drop_to(app, 0)  # the old pool was disposed


# -- item 4: eviction spares engines in use; no connection outlives its registry ---------


@pytest.mark.parametrize("poolclass", ["queue", "singleton", "static", "null"])
def test_idle_eviction_spares_an_engine_with_a_checked_out_connection(
    registry: tuple[pykka.ActorRef[Any], Snapshot], poolclass: str
) -> None:
    ref, snapshot = registry
    app = unique("eh-idle")
    key, entry = get(ref, pg("idle", app, poolclass=poolclass))
    far_future = time.monotonic() + 3600  # idle for an hour by get()'s clock
    with entry.engine.connect() as conn:
        select_one(conn)
        assert ref.ask(Sweep(idle_timeout=60, max_engines=5, now=far_future), timeout=TIMEOUT) == 0
        assert key in snapshot.entries
        select_one(conn)
    assert ref.ask(Sweep(idle_timeout=60, max_engines=5, now=far_future), timeout=TIMEOUT) == 1
    assert key not in snapshot.entries
    server_connections_drop_to(app, 0)


def test_lru_bound_spares_an_engine_in_use(
    registry: tuple[pykka.ActorRef[Any], Snapshot],
) -> None:
    ref, snapshot = registry  # max_engines=1
    app = unique("eh-lru")
    busy_key, busy = get(ref, pg("lru-a", app))
    with busy.engine.connect() as conn:
        select_one(conn)
        other_key, _ = get(ref, pg("lru-b", app))
        assert busy_key in snapshot.entries and other_key in snapshot.entries
        select_one(conn)
    now = time.monotonic()
    assert ref.ask(Sweep(idle_timeout=3600, max_engines=1, now=now), timeout=TIMEOUT) == 1
    assert len(snapshot.entries) == 1


def test_a_checkout_after_disposal_does_not_park_a_connection(
    registry: tuple[pykka.ActorRef[Any], Snapshot],
) -> None:
    ref, _ = registry
    app = unique("eh-race")
    spec = pg("race", app)
    _, entry = get(ref, spec)
    engine = entry.engine  # what a caller read from the snapshot just before the dispose
    assert ref.ask(DisposeDatabase(spec.id), timeout=TIMEOUT) == 1
    with engine.connect() as conn:  # lands in the disposed engine's fresh pool
        select_one(conn)
    server_connections_drop_to(app, 0)  # closed at checkin, not parked


def test_no_connection_survives_shutdown() -> None:
    app = unique("eh-shutdown")
    spec = pg("shutdown", app)
    manager = EngineManager(cleanup_interval=60, ask_timeout=TIMEOUT)
    engine = manager.get(spec)
    conn = engine.connect()
    select_one(conn)
    manager.shutdown()
    select_one(conn)  # a caller's open connection finishes its work
    conn.close()
    with engine.connect() as late:  # and one opened on a kept engine after shutdown
        select_one(late)
    server_connections_drop_to(app, 0)


def test_next_sweep_closes_a_connection_parked_in_a_retired_pool(
    registry: tuple[pykka.ActorRef[Any], Snapshot],
) -> None:
    """The narrow race: a checkin that read "not retired" just before the retirement.

    Simulated by clearing the flag after the disposal: the connection parks in
    the pool the disposal replaced, which nobody else can reach.
    """
    ref, _ = registry
    app = unique("eh-parked")
    spec = pg("parked", app)
    _, entry = get(ref, spec)
    conn = entry.engine.connect()
    select_one(conn)
    assert ref.ask(DisposeDatabase(spec.id), timeout=TIMEOUT) == 1
    entry.retired = False  # the checkin below behaves as if it raced the retirement
    conn.close()
    assert PgSampler(app).now() == 1  # parked in the old pool
    ref.ask(Sweep(idle_timeout=3600, max_engines=5, now=time.monotonic()), timeout=TIMEOUT)
    server_connections_drop_to(app, 0)
