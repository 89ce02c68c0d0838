"""The EngineRegistry actor, spoken to with messages only (no facade)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pykka
import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine

from enginehouse.actors.registry import EngineRegistry, Snapshot
from enginehouse.errors import DriverNotInstalledError
from enginehouse.messages.registry import (
    BuildUncached,
    CachedEngine,
    DisposeAll,
    DisposeDatabase,
    EnginePlan,
    GetEngine,
    GetStats,
    RegistryStats,
    RequestKey,
    Sweep,
)
from enginehouse.messages.supervision import ChildExited
from enginehouse.plan import build_plan, request_key
from enginehouse.settings import ManagerSettings
from enginehouse.specs import DatabaseSpec

pytestmark = pytest.mark.services("postgres")

TIMEOUT = 10.0


def request(
    spec: DatabaseSpec, settings: ManagerSettings, **kw: Any
) -> tuple[RequestKey, EnginePlan]:
    args: dict[str, Any] = {"catalog": None, "schema": None, "user": None, "source": None, **kw}
    key = request_key(spec, settings, **args)
    return key, build_plan(spec, key, settings)


def track_disposal(engine: Engine) -> list[Engine]:
    disposed: list[Engine] = []
    event.listen(engine, "engine_disposed", disposed.append)
    return disposed


@pytest.fixture
def settings() -> ManagerSettings:
    return ManagerSettings.build(mode="singleton")


@pytest.fixture
def spec(tmp_path: Path) -> DatabaseSpec:
    return DatabaseSpec(id=7, uri=f"sqlite:///{tmp_path / 'reg.db'}")


@pytest.fixture
def registry(
    recorder: pykka.ActorRef[Any],
) -> Iterator[tuple[pykka.ActorRef[Any], Snapshot]]:
    snapshot = Snapshot()
    ref = EngineRegistry.start(snapshot, max_engines=3, supervisor=recorder)
    yield ref, snapshot
    if ref.is_alive():
        ref.stop()


def ask(ref: pykka.ActorRef[Any], message: object) -> Any:
    return ref.ask(message, timeout=TIMEOUT)


def test_miss_builds_once_and_publishes_snapshot(
    registry: tuple[pykka.ActorRef[Any], Snapshot], spec: DatabaseSpec, settings: ManagerSettings
) -> None:
    ref, snapshot = registry
    key, plan = request(spec, settings)
    first: CachedEngine = ask(ref, GetEngine(key, plan))
    second: CachedEngine = ask(ref, GetEngine(key, plan))
    assert first is second
    assert snapshot.entries[key] is first
    with first.engine.connect() as conn:
        assert conn.execute(text("select 1")).scalar() == 1
    stats: RegistryStats = ask(ref, GetStats())
    assert (stats.misses, stats.created, len(stats.engines)) == (1, 1, 1)
    assert stats.engines[0].database_id == 7


def test_published_mapping_is_never_mutated(
    registry: tuple[pykka.ActorRef[Any], Snapshot], spec: DatabaseSpec, settings: ManagerSettings
) -> None:
    ref, snapshot = registry
    before = snapshot.entries
    key, plan = request(spec, settings)
    ask(ref, GetEngine(key, plan))
    assert len(before) == 0 and len(snapshot.entries) == 1
    with pytest.raises(TypeError):
        snapshot.entries[key] = None


def test_two_request_keys_with_the_same_plan_share_an_engine(
    registry: tuple[pykka.ActorRef[Any], Snapshot], spec: DatabaseSpec, settings: ManagerSettings
) -> None:
    ref, snapshot = registry
    key, plan = request(spec, settings)
    alias = key._replace(source="elsewhere")
    assert ask(ref, GetEngine(key, plan)) is ask(ref, GetEngine(alias, plan))
    assert set(snapshot.entries) == {key, alias}
    assert ask(ref, GetStats()).created == 1


def test_dispose_database_disposes_and_unpublishes(
    registry: tuple[pykka.ActorRef[Any], Snapshot], tmp_path: Path, settings: ManagerSettings
) -> None:
    ref, snapshot = registry
    a = DatabaseSpec(id="a", uri=f"sqlite:///{tmp_path / 'a.db'}")
    b = DatabaseSpec(id="b", uri=f"sqlite:///{tmp_path / 'b.db'}")
    entry_a: CachedEngine = ask(ref, GetEngine(*request(a, settings)))
    ask(ref, GetEngine(*request(b, settings)))
    disposed = track_disposal(entry_a.engine)
    assert ask(ref, DisposeDatabase("a")) == 1
    assert disposed == [entry_a.engine]
    assert [k.database_id for k in snapshot.entries] == ["b"]
    assert ask(ref, DisposeDatabase("missing")) == 0


def test_engine_dispose_by_caller_removes_it(
    registry: tuple[pykka.ActorRef[Any], Snapshot],
    spec: DatabaseSpec,
    settings: ManagerSettings,
    poll: Callable[..., object],
) -> None:
    ref, snapshot = registry
    key, plan = request(spec, settings)
    entry: CachedEngine = ask(ref, GetEngine(key, plan))
    entry.engine.dispose()
    poll(lambda: key not in snapshot.entries, what="the registry to forget a disposed engine")
    fresh: CachedEngine = ask(ref, GetEngine(key, plan))
    assert fresh.engine is not entry.engine
    assert ask(ref, GetStats()).created == 2


def test_sweep_evicts_idle_engines(
    registry: tuple[pykka.ActorRef[Any], Snapshot], spec: DatabaseSpec, settings: ManagerSettings
) -> None:
    ref, snapshot = registry
    key, plan = request(spec, settings)
    entry: CachedEngine = ask(ref, GetEngine(key, plan))
    disposed = track_disposal(entry.engine)
    ask(ref, Sweep(idle_timeout=60.0, max_engines=3, now=time.monotonic()))
    assert key in snapshot.entries  # not idle yet
    ask(ref, Sweep(idle_timeout=60.0, max_engines=3, now=time.monotonic() + 61.0))
    assert key not in snapshot.entries
    assert disposed == [entry.engine]
    assert ask(ref, GetStats()).evictions == 1


def test_max_engines_evicts_least_recently_used(
    registry: tuple[pykka.ActorRef[Any], Snapshot], tmp_path: Path, settings: ManagerSettings
) -> None:
    ref, snapshot = registry  # max_engines=3
    specs = [DatabaseSpec(id=i, uri=f"sqlite:///{tmp_path / f'{i}.db'}") for i in range(4)]
    keys = []
    for spec in specs[:3]:
        key, plan = request(spec, settings)
        ask(ref, GetEngine(key, plan))
        keys.append(key)
    snapshot.entries[keys[0]].last_used = time.monotonic()  # a hit, as the facade stamps it
    key3, plan3 = request(specs[3], settings)
    ask(ref, GetEngine(key3, plan3))
    assert set(snapshot.entries) == {keys[0], keys[2], key3}
    assert ask(ref, GetStats()).evictions == 1


def test_uncached_engine_is_not_published_but_disposed_on_dispose_all(
    registry: tuple[pykka.ActorRef[Any], Snapshot], spec: DatabaseSpec
) -> None:
    ref, snapshot = registry
    new_settings = ManagerSettings.build(mode="new")
    _, plan = request(spec, new_settings)
    first: Engine = ask(ref, BuildUncached(plan))
    second: Engine = ask(ref, BuildUncached(plan))
    assert first is not second
    assert type(first.pool).__name__ == "NullPool"
    assert len(snapshot.entries) == 0
    disposed = track_disposal(first)
    ask(ref, DisposeAll())
    assert disposed == [first]
    assert ask(ref, GetStats()).uncached_created == 2


def test_driver_error_goes_to_the_caller_and_the_actor_keeps_running(
    registry: tuple[pykka.ActorRef[Any], Snapshot], settings: ManagerSettings, spec: DatabaseSpec
) -> None:
    ref, _ = registry
    missing = DatabaseSpec(id=9, uri="postgresql+pg8000://u:s3cr3t-pw@127.0.0.1/x")
    with pytest.raises(DriverNotInstalledError) as info:
        ask(ref, GetEngine(*request(missing, settings)))
    assert "s3cr3t-pw" not in str(info.value)
    assert ref.is_alive()
    assert ask(ref, GetEngine(*request(spec, settings))).engine is not None


def test_unknown_tell_crashes_reports_and_disposes(
    registry: tuple[pykka.ActorRef[Any], Snapshot],
    recorder: pykka.ActorRef[Any],
    spec: DatabaseSpec,
    settings: ManagerSettings,
    poll: Callable[..., object],
) -> None:
    ref, snapshot = registry
    entry: CachedEngine = ask(ref, GetEngine(*request(spec, settings)))
    disposed = track_disposal(entry.engine)
    ref.tell("not a message")
    exited = poll(lambda: [m for m in ask(recorder, "seen") if isinstance(m, ChildExited)])
    assert isinstance(exited, list)
    assert exited[0].name == "registry" and exited[0].urn == ref.actor_urn
    assert "TypeError" in exited[0].reason
    assert disposed == [entry.engine]
    assert len(snapshot.entries) == 0
    poll(lambda: not ref.is_alive())
    with pytest.raises(pykka.ActorDeadError):
        ref.ask(GetStats(), timeout=TIMEOUT)


def test_stop_disposes_every_engine(
    registry: tuple[pykka.ActorRef[Any], Snapshot], spec: DatabaseSpec, settings: ManagerSettings
) -> None:
    ref, snapshot = registry
    entry: CachedEngine = ask(ref, GetEngine(*request(spec, settings)))
    disposed = track_disposal(entry.engine)
    ref.stop(block=True, timeout=TIMEOUT)
    assert disposed == [entry.engine]
    assert len(snapshot.entries) == 0


def test_a_hidden_entry_is_published_again(
    registry: tuple[pykka.ActorRef[Any], Snapshot], spec: DatabaseSpec, settings: ManagerSettings
) -> None:
    """A crashed predecessor may publish an empty snapshot late; the next miss repairs it."""
    ref, snapshot = registry
    key, plan = request(spec, settings)
    entry: CachedEngine = ask(ref, GetEngine(key, plan))
    snapshot.entries = MappingProxyType({})  # what the old registry's on_failure publishes
    assert ask(ref, GetEngine(key, plan)) is entry
    assert snapshot.entries.get(key) is entry
    assert ask(ref, GetStats()).created == 1
