"""Cached engines keep SQLAlchemy's event-free statement path, and events still work.

The registry listens for ``engine_disposed`` on every cached engine; that
listener alone must not switch on per-statement event dispatch (it cost
15-20% of a pooled SELECT 1, see docs/benchmarks.md), while listeners that
callers add later must still fire and disposal must still reach the registry.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.errors import InvalidSpecError

pytestmark = pytest.mark.services("postgres")


def test_cached_engine_has_no_statement_events(
    manager: EngineManager, pg_spec: DatabaseSpec
) -> None:
    engine = manager.get(pg_spec)
    assert engine._has_events is False


def test_listener_added_by_caller_still_fires(
    manager: EngineManager, pg_spec: DatabaseSpec
) -> None:
    engine = manager.get(pg_spec)
    statements: list[str] = []

    def before_execute(conn: object, clause: object, *args: object) -> None:
        statements.append(str(clause))

    event.listen(engine, "before_execute", before_execute)
    with manager.connect(pg_spec) as connection:
        assert connection.execute(text("select 1")).scalar() == 1
    assert statements == ["select 1"]


def test_caller_dispose_still_reaches_registry(
    manager: EngineManager, pg_spec: DatabaseSpec
) -> None:
    engine: Engine = manager.get(pg_spec)
    engine.dispose()
    deadline = time.monotonic() + 10
    while manager.stats().engine_count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert manager.stats().engine_count == 0
    assert manager.get(pg_spec) is not engine


# -- connect() without an engine_context: a class, not a generator -----------------


def test_connect_runs_nothing_until_entered(manager: EngineManager, pg_spec: DatabaseSpec) -> None:
    checkout = manager.connect(pg_spec)
    assert manager.stats().misses == 0
    with checkout as connection:
        assert connection.execute(text("select 1")).scalar() == 1
    assert manager.stats().misses == 1


def test_connect_returns_the_connection_to_the_pool(
    manager: EngineManager, pg_spec: DatabaseSpec
) -> None:
    engine = manager.get(pg_spec)
    with manager.connect(pg_spec) as connection:
        assert engine.pool.checkedout() == 1
        assert not connection.closed
    assert connection.closed
    assert engine.pool.checkedout() == 0


def test_connect_error_in_block_propagates_and_closes(
    manager: EngineManager, pg_spec: DatabaseSpec
) -> None:
    engine = manager.get(pg_spec)
    with pytest.raises(LookupError, match="from the block"), manager.connect(pg_spec) as connection:
        raise LookupError("from the block")
    assert connection.closed
    assert engine.pool.checkedout() == 0


def test_connect_in_new_mode_disposes_after_block_and_after_error(
    new_manager: EngineManager, pg_spec: DatabaseSpec
) -> None:
    disposed: list[Engine] = []
    for fail in (False, True):
        try:
            with new_manager.connect(pg_spec) as connection:
                engine = connection.engine
                event.listen(engine, "engine_disposed", disposed.append)
                if fail:
                    raise LookupError("from the block")
        except LookupError:
            assert fail
        assert disposed[-1] is engine
    assert len(disposed) == 2


def test_connect_lookup_error_surfaces_at_entry(manager: EngineManager) -> None:
    sqlite = DatabaseSpec(id="hot-sqlite", uri="sqlite://")
    checkout = manager.connect(sqlite, schema="main")  # SQLite has no schemas
    with pytest.raises(InvalidSpecError, match="schema"), checkout:
        raise AssertionError("entered without an engine")


# -- the hit key: request_key's rule as a plain tuple ---------------------------------


@pytest.mark.parametrize(
    "request_",
    [{}, {"schema": "public"}, {"catalog": "test"}, {"source": "SQL_LAB"}, {"user": "ann"}],
)
def test_a_second_get_of_any_request_is_a_hit(
    manager: EngineManager, pg_spec: DatabaseSpec, request_: dict[str, str]
) -> None:
    first = manager.get(pg_spec, **request_)
    before = manager.stats()
    assert manager.get(pg_spec, **request_) is first
    with manager.connect(pg_spec, **request_) as connection:
        assert connection.engine is first
    after = manager.stats()
    assert (after.misses, after.hits) == (before.misses, before.hits + 2)


def test_source_and_user_reach_the_key_only_under_a_mutator(pg_spec: DatabaseSpec) -> None:
    seen: list[tuple[str | None, str | None]] = []

    def mutator(url: Any, kwargs: dict[str, Any], *, user: Any, source: Any) -> Any:
        seen.append((user, source))
        return url, kwargs

    with EngineManager(connection_mutator=mutator, cleanup_interval=60) as manager:
        # Three keys (the mutator may read user and source), then a hit on the first;
        # the engines are shared, since this mutator leaves URL and arguments alone.
        dashboards = manager.get(pg_spec, source="DASHBOARD", user="ann")
        manager.get(pg_spec, source="SQL_LAB", user="ann")
        manager.get(pg_spec, source="DASHBOARD", user="bob")
        assert manager.get(pg_spec, source="DASHBOARD", user="ann") is dashboards
        assert manager.stats().hits == 1  # the mutator ran once per new key (below)
    assert seen == [("ann", "DASHBOARD"), ("ann", "SQL_LAB"), ("bob", "DASHBOARD")]
    with EngineManager(cleanup_interval=60) as plain:  # no mutator: one engine for all
        engine = plain.get(pg_spec, source="DASHBOARD", user="ann")
        assert plain.get(pg_spec, source="SQL_LAB", user="bob") is engine
        assert (plain.stats().misses, plain.stats().hits) == (1, 1)
