"""Cached engines keep SQLAlchemy's event-free statement path, and events still work.

The registry listens for ``engine_disposed`` on every cached engine; that
listener alone must not switch on per-statement event dispatch (it cost
15-20% of a pooled SELECT 1, see docs/benchmarks.md), while listeners that
callers add later must still fire and disposal must still reach the registry.
"""

from __future__ import annotations

import time

from sqlalchemy import event, text
from sqlalchemy.engine import Engine

from app import DatabaseSpec, EngineManager


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
