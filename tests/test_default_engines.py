"""``engines``: the process-wide default manager, lazily started, reconfigurable."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pykka
import pytest
from sqlalchemy import text

import enginehouse.default
from enginehouse import DatabaseSpec, DefaultEngines, EngineManager, Mode, engines
from enginehouse.actors import Supervisor
from enginehouse.errors import ConfigurationError

pytestmark = pytest.mark.usefixtures("sqlite_files_allowed")


@pytest.fixture
def spec(tmp_path: Path) -> DatabaseSpec:
    return DatabaseSpec(id="default", uri=f"sqlite:///{tmp_path / 'default.db'}")


@pytest.fixture
def default_engines() -> Iterator[DefaultEngines]:
    """The global instance, stopped and reset to unconfigured afterwards."""
    engines.shutdown()
    saved = engines._settings
    yield engines
    engines.shutdown()
    engines._settings = saved


def supervisors() -> int:
    return len([r for r in pykka.ActorRegistry.get_by_class(Supervisor) if r.is_alive()])


def test_get_starts_lazily_and_reuses_the_manager(
    default_engines: DefaultEngines, spec: DatabaseSpec
) -> None:
    default_engines.configure(mode="singleton", idle_timeout=300, cleanup_interval=60)
    assert default_engines._manager is None  # nothing started by configure
    engine = default_engines.get(spec)
    manager = default_engines.manager()
    assert isinstance(manager, EngineManager) and not manager.closed
    assert default_engines.get(spec) is engine
    assert default_engines.manager() is manager
    with default_engines.connect(spec) as conn:
        assert conn.execute(text("select 1")).scalar() == 1
    stats = default_engines.stats()
    assert stats.mode is Mode.SINGLETON and stats.created == 1
    assert manager.settings.idle_timeout == 300
    assert default_engines.dispose(spec.id) == 1


def test_configure_again_restarts_with_new_settings(
    default_engines: DefaultEngines, spec: DatabaseSpec
) -> None:
    default_engines.configure(mode="singleton", cleanup_interval=60)
    first = default_engines.manager()
    cached = default_engines.get(spec)
    default_engines.configure(mode="new", cleanup_interval=60)
    assert first.closed
    second = default_engines.manager()
    assert second is not first and second.settings.mode is Mode.NEW
    assert default_engines.get(spec) is not cached
    assert default_engines.get(spec) is not default_engines.get(spec)


def test_invalid_configure_keeps_the_running_manager(
    default_engines: DefaultEngines, spec: DatabaseSpec
) -> None:
    default_engines.configure(cleanup_interval=60)
    manager = default_engines.manager()
    with pytest.raises(ConfigurationError) as info:
        default_engines.configure(idle_timeout=-1)
    assert info.value.field == "idle_timeout"
    assert default_engines.manager() is manager and not manager.closed


def test_shutdown_stops_everything_and_next_call_starts_again(
    default_engines: DefaultEngines, spec: DatabaseSpec, poll: Callable[..., object]
) -> None:
    before = set(threading.enumerate())
    default_engines.configure(cleanup_interval=0.05)
    default_engines.get(spec)
    manager = default_engines.manager()
    default_engines.shutdown()
    assert manager.closed
    poll(lambda: set(threading.enumerate()) <= before, what="the default manager's threads")
    assert default_engines.get(spec) is not None  # lazily started again
    assert default_engines.manager() is not manager


def test_concurrent_first_use_starts_exactly_one_manager(
    monkeypatch: pytest.MonkeyPatch, spec: DatabaseSpec
) -> None:
    created = itertools.count()

    class Counting(EngineManager):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            next(created)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(enginehouse.default, "EngineManager", Counting)
    fresh = DefaultEngines()
    fresh.configure(cleanup_interval=60)
    supervisors_before = supervisors()
    barrier = threading.Barrier(32, timeout=30)

    def first_use(_: int) -> tuple[EngineManager, int]:
        barrier.wait()
        engine = fresh.get(spec)
        return fresh.manager(), id(engine)

    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(first_use, range(32)))
        assert len({id(manager) for manager, _ in results}) == 1
        assert len({engine for _, engine in results}) == 1
        assert int(repr(created)[6:-1]) == 1
        assert supervisors() == supervisors_before + 1
    finally:
        fresh.shutdown()


def test_configure_during_start_never_hands_out_a_stale_manager(
    monkeypatch: pytest.MonkeyPatch, spec: DatabaseSpec
) -> None:
    fresh = DefaultEngines()
    built: list[EngineManager] = []

    class Reconfigured(EngineManager):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)
            if len(built) == 1:  # a configure() lands while the first manager starts
                fresh.configure(mode="new", cleanup_interval=60)

    monkeypatch.setattr(enginehouse.default, "EngineManager", Reconfigured)
    fresh.configure(mode="singleton", cleanup_interval=60)
    try:
        manager = fresh.manager()
        assert manager.settings.mode is Mode.NEW and not manager.closed
        assert built[0].closed  # the stale one was not left running
        assert fresh.get(spec) is not fresh.get(spec)
    finally:
        fresh.shutdown()
    assert all(m.closed for m in built)


def test_call_racing_a_configure_is_served_by_the_new_manager(
    default_engines: DefaultEngines, spec: DatabaseSpec
) -> None:
    default_engines.configure(cleanup_interval=60)
    old = default_engines.manager()
    old_engine = old._engine  # what engines.get() calls on the running manager

    def engine_after_reconfigure(*args: Any, **kwargs: Any) -> Any:
        default_engines.configure(mode="new", cleanup_interval=60)  # shuts `old` down
        return old_engine(*args, **kwargs)

    old._engine = engine_after_reconfigure
    engine = default_engines.get(spec)
    assert engine is not None
    assert old.closed and default_engines.manager().settings.mode is Mode.NEW


def test_manager_shut_down_directly_is_replaced(
    default_engines: DefaultEngines, spec: DatabaseSpec
) -> None:
    default_engines.configure(cleanup_interval=60)
    first = default_engines.manager()
    first.shutdown()
    assert default_engines.get(spec) is not None
    assert default_engines.manager() is not first


def test_connect_takes_the_manager_running_when_the_block_is_entered(
    default_engines: DefaultEngines, spec: DatabaseSpec
) -> None:
    checkout = default_engines.connect(spec)  # nothing runs before the block
    default_engines.configure(mode="singleton")
    with checkout as connection:
        assert connection.execute(text("select 1")).scalar() == 1
        assert default_engines.manager().stats().misses == 1
    with default_engines.connect(spec) as connection:
        assert connection.execute(text("select 2")).scalar() == 2
    assert default_engines.manager().stats().hits == 1
