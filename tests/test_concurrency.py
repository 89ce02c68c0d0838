"""Single-flight under contention, many keys at once, and calls racing a crash."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pykka
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.actors import EngineRegistry
from enginehouse.errors import EngineManagerError
from enginehouse.messages.registry import BuildUncached, GetEngine
from enginehouse.messages.supervision import WhereIs

pytestmark = [pytest.mark.usefixtures("sqlite_files_allowed"), pytest.mark.services("postgres")]

THREADS = 48
T = TypeVar("T")


def together(count: int, work: Callable[[int], T]) -> list[T]:
    """Run ``work(i)`` in ``count`` threads released at the same instant."""
    barrier = threading.Barrier(count, timeout=30)

    def run(i: int) -> T:
        barrier.wait()
        return work(i)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count)))


def test_same_new_key_from_many_threads_builds_one_engine(
    manager: EngineManager, tmp_path: Path
) -> None:
    spec = DatabaseSpec(id="hot", uri=f"sqlite:///{tmp_path / 'hot.db'}")
    engines = together(THREADS, lambda _: manager.get(spec, schema=None))
    assert len({id(e) for e in engines}) == 1
    stats = manager.stats()
    assert stats.created == 1
    assert stats.misses == 1
    assert stats.engine_count == 1


def test_same_new_key_on_postgres(manager: EngineManager, pg_spec: DatabaseSpec) -> None:
    def work(_: int) -> tuple[Engine, Any]:
        engine = manager.get(pg_spec)
        with engine.connect() as conn:
            return engine, conn.execute(text("select 1")).scalar()

    results = together(32, work)
    assert len({id(engine) for engine, _ in results}) == 1
    assert {value for _, value in results} == {1}
    assert manager.stats().created == 1


def test_many_keys_in_parallel(manager: EngineManager, tmp_path: Path) -> None:
    keys = 8
    specs = [DatabaseSpec(id=i, uri=f"sqlite:///{tmp_path / f'{i}.db'}") for i in range(keys)]
    engines = together(THREADS, lambda i: (i % keys, manager.get(specs[i % keys])))
    by_key: dict[int, set[int]] = {}
    for key, engine in engines:
        by_key.setdefault(key, set()).add(id(engine))
    assert all(len(ids) == 1 for ids in by_key.values())
    assert len({next(iter(ids)) for ids in by_key.values()}) == keys
    stats = manager.stats()
    assert (stats.created, stats.engine_count) == (keys, keys)


def test_new_mode_gives_every_thread_its_own_engine(
    new_manager: EngineManager, tmp_path: Path
) -> None:
    spec = DatabaseSpec(id=1, uri=f"sqlite:///{tmp_path / 'n.db'}")
    engines = together(32, lambda _: new_manager.get(spec))
    assert len({id(e) for e in engines}) == 32
    assert new_manager.stats().uncached_created == 32


def test_calls_racing_a_registry_crash_succeed_or_fail_clearly(tmp_path: Path) -> None:
    specs = [DatabaseSpec(id=i, uri=f"sqlite:///{tmp_path / f'{i}.db'}") for i in range(16)]
    with EngineManager(
        cleanup_interval=60, ask_timeout=10, restart_backoff=0, forbid_unsafe_uris=False
    ) as manager:
        supervisor = manager._system.supervisor  # private; fine in a test
        registry: Any = supervisor.ask(WhereIs("registry"), timeout=10)

        def work(i: int) -> str:
            if i == 0:
                registry.tell("crash")
                return "crashed"
            try:
                manager.get(specs[i % len(specs)])
            except EngineManagerError as exc:  # allowed: a clear error, not a hang
                return type(exc).__name__
            return "ok"

        outcomes = together(32, work)
        assert "ok" in outcomes
        assert set(outcomes) <= {"ok", "crashed", "ActorUnavailableError"}
        # Afterwards the facade serves every key from the restarted registry.
        assert all(manager.get(spec) is manager.get(spec) for spec in specs)
        assert manager.stats().restarts == 1
        live = [ref for ref in pykka.ActorRegistry.get_by_class(EngineRegistry) if ref.is_alive()]
        assert registry not in live and len(live) == 1


def test_hit_path_makes_no_actor_round_trip(
    manager: EngineManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = DatabaseSpec(id="hits", uri=f"sqlite:///{tmp_path / 'hits.db'}")
    engine = manager.get(spec)  # the miss: one ask
    asks = []
    real_ask = pykka.ActorRef.ask

    def counting_ask(self: Any, *args: Any, **kwargs: Any) -> Any:
        asks.append(args[0])
        return real_ask(self, *args, **kwargs)

    monkeypatch.setattr(pykka.ActorRef, "ask", counting_ask)
    hits = together(32, lambda _: manager.get(spec))
    assert all(hit is engine for hit in hits)
    # Other areas' actors may ask in the background; the registry and supervisor get nothing.
    assert [m for m in asks if isinstance(m, GetEngine | WhereIs | BuildUncached)] == []
    monkeypatch.undo()
    assert manager.stats().hits == 32


def test_threads_racing_a_supervisor_crash_start_one_new_system(
    tmp_path: Path, poll: Callable[..., object]
) -> None:
    from enginehouse.actors import Supervisor

    specs = [DatabaseSpec(id=i, uri=f"sqlite:///{tmp_path / f'{i}.db'}") for i in range(8)]
    with EngineManager(cleanup_interval=60, ask_timeout=10, restart_backoff=0) as manager:
        supervisor = manager._system.supervisor  # private; fine in a test
        supervisor.tell("inject a failure")
        poll(lambda: not supervisor.is_alive())
        engines = together(32, lambda i: manager.get(specs[i % len(specs)]))
        assert len({id(e) for e in engines}) == len(specs)
        assert manager.stats().restarts == 1
        live = [r for r in pykka.ActorRegistry.get_by_class(Supervisor) if r.is_alive()]
        assert manager._system.supervisor in live and supervisor not in live
