"""The facade on SQLite files: caching, modes, pools, mutator, eviction, LRU, disposal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy import pool as sa_pool
from sqlalchemy.engine import URL, Engine

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.errors import InvalidSpecError

pytestmark = pytest.mark.usefixtures("sqlite_files_allowed")


def sqlite_spec(tmp_path: Path, db_id: int | str = 1, **extra: Any) -> DatabaseSpec:
    return DatabaseSpec(id=db_id, uri=f"sqlite:///{tmp_path / f'{db_id}.db'}", extra=extra)


@pytest.fixture
def spec(tmp_path: Path) -> DatabaseSpec:
    return sqlite_spec(tmp_path)


def test_same_inputs_same_engine(manager: EngineManager, spec: DatabaseSpec) -> None:
    engine = manager.get(spec)
    assert manager.get(spec) is engine
    assert manager.get(DatabaseSpec(id=spec.id, uri=spec.uri)) is engine  # an equal spec
    with manager.connect(spec) as conn:
        assert conn.execute(text("select 1")).scalar() == 1
    stats = manager.stats()
    assert (stats.engine_count, stats.created, stats.misses) == (1, 1, 1)
    assert stats.hits >= 2


def test_user_ignored_without_impersonation(manager: EngineManager, spec: DatabaseSpec) -> None:
    assert manager.get(spec, user="alice") is manager.get(spec, user="bob")
    assert manager.get(spec, source="sql_lab") is manager.get(spec, source="chart")


def test_schema_on_sqlite_is_refused(manager: EngineManager, spec: DatabaseSpec) -> None:
    with pytest.raises(InvalidSpecError) as info:
        manager.get(spec, schema="main")
    assert info.value.field == "schema"
    assert "schema" in str(info.value)
    assert manager.get(spec) is not None


def test_new_mode_builds_a_fresh_nullpool_engine_each_time(
    new_manager: EngineManager, spec: DatabaseSpec
) -> None:
    first, second = new_manager.get(spec), new_manager.get(spec)
    assert first is not second
    assert isinstance(first.pool, sa_pool.NullPool)
    assert new_manager.stats().uncached_created == 2
    assert new_manager.stats().engine_count == 0


def test_new_mode_connect_disposes_on_exit(
    new_manager: EngineManager, spec: DatabaseSpec
) -> None:
    disposed: list[Engine] = []
    record = disposed.append
    event.listen(Engine, "engine_disposed", record)  # every engine, class-wide
    try:
        with new_manager.connect(spec) as conn:
            assert conn.execute(text("select 1")).scalar() == 1
            engine = conn.engine
            assert engine not in disposed
        assert engine in disposed
    finally:
        event.remove(Engine, "engine_disposed", record)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("queue", sa_pool.QueuePool),
        ("singleton", sa_pool.SingletonThreadPool),
        ("assertion", sa_pool.AssertionPool),
        ("null", sa_pool.NullPool),
        ("static", sa_pool.StaticPool),
        (None, sa_pool.QueuePool),
    ],
)
def test_singleton_pool_class_from_extra(
    manager: EngineManager, tmp_path: Path, name: str | None, expected: type[sa_pool.Pool]
) -> None:
    params = {"poolclass": name} if name else {}
    spec = sqlite_spec(tmp_path, engine_params=params)
    engine = manager.get(spec)
    assert type(engine.pool) is expected
    with engine.connect() as conn:
        assert conn.execute(text("select 1")).scalar() == 1
    assert manager.stats().engines[0].pool_class == expected.__name__


def test_pool_arguments_are_passed(manager: EngineManager, tmp_path: Path) -> None:
    spec = sqlite_spec(tmp_path, engine_params={"pool_size": 7, "max_overflow": 2})
    pool = manager.get(spec).pool
    assert isinstance(pool, sa_pool.QueuePool)
    assert pool.size() == 7
    assert manager.stats().engines[0].size == 7


def test_changed_spec_retires_old_engines(manager: EngineManager, tmp_path: Path) -> None:
    old = sqlite_spec(tmp_path, engine_params={"pool_size": 2})
    new = sqlite_spec(tmp_path, engine_params={"pool_size": 3})
    old_engine = manager.get(old)
    new_engine = manager.get(new)
    assert new_engine is not old_engine
    assert manager.stats().engine_count == 1


def test_dispose_database(manager: EngineManager, tmp_path: Path) -> None:
    one, two = sqlite_spec(tmp_path, 1), sqlite_spec(tmp_path, 2)
    first = manager.get(one)
    manager.get(two)
    assert manager.dispose(1) == 1
    assert manager.get(one) is not first
    assert {e.database_id for e in manager.stats().engines} == {1, 2}


def mutator(url: URL, kwargs: dict[str, Any], *, user: str | None, source: str | None) -> Any:
    """Sends ``source="other"`` to another file; records what it was given."""
    SEEN.append((user, source))
    if source == "other":
        assert url.database is not None
        url = url.set(database=url.database.replace(".db", "-other.db"))
    return url, kwargs


SEEN: list[tuple[str | None, str | None]] = []


def ignoring_mutator(url: URL, kwargs: dict[str, Any], *, user: str | None,
                     source: str | None) -> Any:
    return url, kwargs


@pytest.fixture
def mutating_manager() -> Iterator[EngineManager]:
    SEEN.clear()
    with EngineManager(
        forbid_unsafe_uris=False, connection_mutator=mutator, cleanup_interval=60
    ) as m:
        yield m


def test_mutator_receives_user_and_source_and_changes_url(
    mutating_manager: EngineManager, spec: DatabaseSpec
) -> None:
    plain = mutating_manager.get(spec, user="alice", source="sql_lab")
    other = mutating_manager.get(spec, user="alice", source="other")
    assert ("alice", "sql_lab") in SEEN and ("alice", "other") in SEEN
    assert other is not plain
    assert str(other.url.database).endswith("-other.db")


def test_mutator_ignoring_source_shares_one_engine(spec: DatabaseSpec) -> None:
    with EngineManager(
        forbid_unsafe_uris=False, connection_mutator=ignoring_mutator, cleanup_interval=60
    ) as manager:
        a = manager.get(spec, source="dashboard")
        b = manager.get(spec, source="sql_lab")
        assert a is b
        assert manager.stats().created == 1


def test_mutator_from_environment(monkeypatch: pytest.MonkeyPatch, spec: DatabaseSpec) -> None:
    monkeypatch.setenv("ENGINEHOUSE_CONNECTION_MUTATOR", f"{__name__}.mutator")
    SEEN.clear()
    with EngineManager(forbid_unsafe_uris=False, cleanup_interval=60) as manager:
        manager.get(spec, user="u", source="s")
    assert SEEN == [("u", "s")]


def test_idle_engine_is_evicted_by_sweep(
    spec: DatabaseSpec, poll: Callable[..., object]
) -> None:
    with EngineManager(forbid_unsafe_uris=False, idle_timeout=0.05, cleanup_interval=60) as manager:
        engine = manager.get(spec)
        poll(lambda: manager.stats().engines[0].idle_seconds > 0.1)
        manager.sweep()
        poll(lambda: manager.stats().engine_count == 0, what="the idle engine's eviction")
        assert manager.stats().evictions == 1
        assert manager.get(spec) is not engine


def test_idle_engine_is_evicted_by_the_janitor_timer(
    spec: DatabaseSpec, poll: Callable[..., object]
) -> None:
    with EngineManager(
        forbid_unsafe_uris=False, idle_timeout=0.05, cleanup_interval=0.05
    ) as manager:
        manager.get(spec)
        poll(lambda: manager.stats().evictions >= 1, what="the janitor's scheduled sweep")
        assert manager.stats().engine_count == 0


def test_max_engines_keeps_the_recently_used(tmp_path: Path) -> None:
    with EngineManager(forbid_unsafe_uris=False, max_engines=2, cleanup_interval=60) as manager:
        a, b, c = (sqlite_spec(tmp_path, i) for i in ("a", "b", "c"))
        engine_a = manager.get(a)
        engine_b = manager.get(b)
        assert manager.get(a) is engine_a  # a hit: now b is least recently used
        manager.get(c)
        stats = manager.stats()
        assert stats.engine_count == 2
        assert {e.database_id for e in stats.engines} == {"a", "c"}
        assert stats.evictions == 1
        assert manager.get(a) is engine_a
        assert manager.get(b) is not engine_b


def test_engine_dispose_by_caller_removes_it(
    manager: EngineManager, spec: DatabaseSpec, poll: Callable[..., object]
) -> None:
    engine = manager.get(spec)
    engine.dispose()
    poll(lambda: manager.get(spec) is not engine, what="a new engine after dispose()")
    assert manager.stats().engine_count == 1
    assert manager.stats().disposals >= 1
