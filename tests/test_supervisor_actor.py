"""The Supervisor actor with real children, spoken to with messages only."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.actors.janitor import Janitor
from enginehouse.actors.policy import RestartPolicy, RestartType
from enginehouse.actors.registry import EngineRegistry, Snapshot
from enginehouse.actors.supervisor import ChildSpec, Supervisor
from enginehouse.errors import ActorTimeoutError, ActorUnavailableError, EngineManagerError
from enginehouse.messages.registry import GetStats, RegistryStats, Sweep
from enginehouse.messages.supervision import (
    Deliver,
    GetSupervisionStats,
    StopChildren,
    SupervisionStats,
    WhereIs,
)

TIMEOUT = 10.0


def children(policy: RestartPolicy) -> list[ChildSpec]:
    snapshot = Snapshot()
    return [
        ChildSpec(
            "registry",
            lambda sup: EngineRegistry.start(snapshot, max_engines=4, supervisor=sup),
            policy,
        ),
        ChildSpec(
            "janitor",
            lambda sup: Janitor.start(
                sup, interval=60.0, idle_timeout=60.0, max_engines=4, ask_timeout=TIMEOUT
            ),
            policy,
        ),
    ]


def stop_all(supervisor: pykka.ActorRef[Any]) -> None:
    if supervisor.is_alive():
        supervisor.ask(StopChildren(TIMEOUT), timeout=TIMEOUT * 3)
        supervisor.stop(block=True, timeout=TIMEOUT)


@pytest.fixture
def start() -> Iterator[Callable[[RestartPolicy], pykka.ActorRef[Any]]]:
    started: list[pykka.ActorRef[Any]] = []

    def run(policy: RestartPolicy) -> pykka.ActorRef[Any]:
        ref = Supervisor.start(children(policy))
        started.append(ref)
        return ref

    yield run
    for ref in started:
        stop_all(ref)


def ask(ref: pykka.ActorRef[Any], message: object) -> Any:
    return ref.ask(message, timeout=TIMEOUT)


def where(supervisor: pykka.ActorRef[Any], name: str) -> pykka.ActorRef[Any]:
    return ask(supervisor, WhereIs(name))


def stats(supervisor: pykka.ActorRef[Any]) -> SupervisionStats:
    return ask(supervisor, GetSupervisionStats())


FAST = RestartPolicy(max_restarts=3, period=60.0, backoff=0.0, backoff_max=0.0)


def test_where_is_answers_live_children(
    start: Callable[[RestartPolicy], pykka.ActorRef[Any]],
) -> None:
    supervisor = start(FAST)
    registry = where(supervisor, "registry")
    janitor = where(supervisor, "janitor")
    assert registry.actor_class is EngineRegistry and registry.is_alive()
    assert janitor.actor_class is Janitor and janitor.is_alive()
    assert [(c.name, c.alive, c.restarts) for c in stats(supervisor).children] == [
        ("registry", True, 0),
        ("janitor", True, 0),
    ]
    with pytest.raises(ActorUnavailableError, match="nope"):
        supervisor.ask(WhereIs("nope"), timeout=TIMEOUT)


@pytest.mark.parametrize("name", ["registry", "janitor"])
def test_crashed_child_is_restarted(
    start: Callable[[RestartPolicy], pykka.ActorRef[Any]],
    poll: Callable[..., object],
    name: str,
) -> None:
    supervisor = start(FAST)
    first = where(supervisor, name)
    first.tell("not a message")  # TypeError in a tell handler: pykka stops it, on_failure reports
    poll(lambda: stats(supervisor).restarts == 1, what=f"{name} to be restarted")
    second = where(supervisor, name)
    assert second.actor_urn != first.actor_urn
    assert second.is_alive() and not first.is_alive()


def test_child_found_dead_is_restarted_once(
    start: Callable[[RestartPolicy], pykka.ActorRef[Any]],
) -> None:
    supervisor = start(FAST)
    first = where(supervisor, "registry")
    first.stop(block=True, timeout=TIMEOUT)  # a death nobody reported
    second = where(supervisor, "registry")
    third = where(supervisor, "registry")
    assert second.actor_urn != first.actor_urn
    assert third.actor_urn == second.actor_urn
    assert stats(supervisor).restarts == 1


def test_gives_up_after_intensity_with_a_clear_error(
    start: Callable[[RestartPolicy], pykka.ActorRef[Any]],
    poll: Callable[..., object],
) -> None:
    supervisor = start(RestartPolicy(max_restarts=1, period=60.0, backoff=0.0, backoff_max=0.0))
    where(supervisor, "registry").tell("crash 1")
    poll(lambda: stats(supervisor).restarts == 1)
    where(supervisor, "registry").tell("crash 2")
    poll(lambda: stats(supervisor).children[0].gave_up is not None)
    with pytest.raises(ActorUnavailableError, match="registry") as info:
        supervisor.ask(WhereIs("registry"), timeout=TIMEOUT)
    assert isinstance(info.value, EngineManagerError)
    assert where(supervisor, "janitor").is_alive()  # one-for-one: the sibling is untouched


def test_temporary_child_is_not_restarted(
    start: Callable[[RestartPolicy], pykka.ActorRef[Any]],
    poll: Callable[..., object],
) -> None:
    supervisor = start(RestartPolicy(restart=RestartType.TEMPORARY))
    where(supervisor, "janitor").tell("crash")
    poll(lambda: stats(supervisor).children[1].gave_up is not None)
    assert stats(supervisor).restarts == 0
    with pytest.raises(ActorUnavailableError, match="temporary"):
        supervisor.ask(WhereIs("janitor"), timeout=TIMEOUT)


def test_forward_reaches_the_child(
    start: Callable[[RestartPolicy], pykka.ActorRef[Any]],
) -> None:
    supervisor = start(FAST)
    supervisor.tell(Deliver("registry", Sweep(idle_timeout=1.0, max_engines=4, now=0.0)))
    supervisor.tell(Deliver("nope", Sweep(idle_timeout=1.0, max_engines=4, now=0.0)))
    registry_stats: RegistryStats = ask(where(supervisor, "registry"), GetStats())
    assert registry_stats.evictions == 0
    assert supervisor.is_alive()  # forwarding to an unknown child is logged, not fatal


def test_stop_children_stops_everything_and_no_thread_is_left(
    poll: Callable[..., object],
) -> None:
    before = set(threading.enumerate())
    supervisor = Supervisor.start(children(FAST))
    kids = [where(supervisor, "registry"), where(supervisor, "janitor")]
    stop_all(supervisor)
    assert not any(kid.is_alive() for kid in kids)
    poll(lambda: set(threading.enumerate()) <= before, what="actor threads to end")


def test_supervisor_crash_stops_its_children(poll: Callable[..., object]) -> None:
    before = set(threading.enumerate())
    supervisor = Supervisor.start(children(FAST))
    kids = [where(supervisor, "registry"), where(supervisor, "janitor")]
    supervisor.tell("not a message")
    poll(lambda: not supervisor.is_alive())
    poll(lambda: not any(kid.is_alive() for kid in kids), what="children to stop with it")
    poll(lambda: set(threading.enumerate()) <= before, what="actor threads to end")


# -- through the facade: a crashed actor is restarted, or fails clearly -----------------------


def child_ref(manager: EngineManager, name: str) -> pykka.ActorRef[Any]:
    return where(manager._system.supervisor, name)  # private: fine in a test


@pytest.fixture
def sqlite_db(tmp_path: Path, sqlite_files_allowed: None) -> DatabaseSpec:
    return DatabaseSpec(id="crash", uri=f"sqlite:///{tmp_path / 'crash.db'}")


def crashing_manager(**settings: Any) -> EngineManager:
    values: dict[str, Any] = {"cleanup_interval": 60, "ask_timeout": 5, "restart_backoff": 0.0}
    return EngineManager(**{**values, **settings})


def test_registry_crash_is_survived_by_the_facade(
    sqlite_db: DatabaseSpec, poll: Callable[..., object]
) -> None:
    with crashing_manager() as manager:
        engine = manager.get(sqlite_db)
        registry = child_ref(manager, "registry")
        registry.tell("inject a failure")
        poll(lambda: manager.stats().restarts == 1, what="the registry's restart")
        assert not registry.is_alive()
        fresh = manager.get(sqlite_db)
        assert fresh is not engine  # the crashed registry disposed what it owned
        with manager.connect(sqlite_db) as conn:
            assert conn.execute(text("select 1")).scalar() == 1
        registry_stats = next(a for a in manager.stats().actors if a.name == "registry")
        assert registry_stats.alive and registry_stats.restarts == 1


def test_janitor_crash_is_survived_by_the_facade(
    sqlite_db: DatabaseSpec, poll: Callable[..., object]
) -> None:
    with crashing_manager(idle_timeout=0.05) as manager:
        janitor = child_ref(manager, "janitor")
        janitor.tell("inject a failure")
        poll(lambda: manager.stats().restarts == 1, what="the janitor's restart")
        assert child_ref(manager, "janitor").actor_urn != janitor.actor_urn
        manager.get(sqlite_db)
        poll(lambda: manager.stats().engines[0].idle_seconds > 0.1)
        manager.sweep()  # served by the new janitor
        poll(lambda: manager.stats().evictions == 1, what="a sweep by the restarted janitor")


@pytest.mark.parametrize("restart_max", [0, 2])
def test_exceeding_restart_intensity_fails_clearly(
    sqlite_db: DatabaseSpec, poll: Callable[..., object], restart_max: int
) -> None:
    before = set(threading.enumerate())
    with crashing_manager(restart_max=restart_max) as manager:
        for crash in range(restart_max + 1):
            registry = child_ref(manager, "registry")
            registry.tell(f"inject failure {crash}")
            poll(lambda ref=registry: not ref.is_alive())
            if crash < restart_max:
                poll(lambda n=crash: manager.stats().restarts == n + 1)
        calls: list[Callable[[], object]] = [
            lambda: manager.get(sqlite_db),
            manager.stats,
            lambda: manager.dispose(sqlite_db.id),
        ]
        for call in calls:
            with pytest.raises(ActorUnavailableError, match="registry") as info:
                call()
            assert isinstance(info.value, EngineManagerError)
    poll(lambda: set(threading.enumerate()) <= before, what="threads to end after shutdown")


def test_supervisor_crash_is_survived_by_the_facade(
    sqlite_db: DatabaseSpec, poll: Callable[..., object]
) -> None:
    before = set(threading.enumerate())
    manager = crashing_manager()
    engine = manager.get(sqlite_db)
    supervisor = manager._system.supervisor
    children = [child_ref(manager, "registry"), child_ref(manager, "janitor")]
    supervisor.tell("inject a failure")
    poll(lambda: not supervisor.is_alive())
    poll(lambda: not any(child.is_alive() for child in children), what="children to stop")
    fresh = manager.get(sqlite_db)  # the facade starts a new actor system
    assert fresh is not engine
    assert manager._system.supervisor is not supervisor
    stats = manager.stats()
    assert stats.restarts == 1
    assert all(actor.alive for actor in stats.actors)
    manager.shutdown()
    poll(lambda: set(threading.enumerate()) <= before, what="every actor thread to end")


def test_supervisor_crashing_too_often_fails_clearly(
    sqlite_db: DatabaseSpec, poll: Callable[..., object]
) -> None:
    before = set(threading.enumerate())
    with crashing_manager(restart_max=0) as manager:
        supervisor = manager._system.supervisor
        supervisor.tell("inject a failure")
        poll(lambda: not supervisor.is_alive())
        for call in (manager.stats, lambda: manager.get(sqlite_db)):
            with pytest.raises(ActorUnavailableError, match="supervisor crashed"):
                call()
    poll(lambda: set(threading.enumerate()) <= before, what="every actor thread to end")


def test_a_busy_supervisor_gives_a_timeout_error_not_a_hang(
    sqlite_db: DatabaseSpec, poll: Callable[..., object]
) -> None:
    before = set(threading.enumerate())
    # The restart backoff (>= 2.4 s with jitter) keeps the supervisor busy far past ask_timeout.
    manager = crashing_manager(ask_timeout=0.5, restart_backoff=3.0, restart_backoff_max=3.0)
    try:
        registry = child_ref(manager, "registry")
        registry.tell("inject a failure")
        poll(lambda: not registry.is_alive())
        with pytest.raises(ActorTimeoutError, match=r"0\.5s"):
            manager.get(sqlite_db)

        def restarted() -> bool:
            try:
                return manager.stats().restarts == 1
            except ActorTimeoutError:
                return False  # still in its backoff

        poll(restarted, what="the delayed restart")
        assert manager.get(sqlite_db) is not None
    finally:
        manager.shutdown()
    poll(lambda: set(threading.enumerate()) <= before, what="threads to end")


class _Stuck(pykka.ThreadingActor):
    """A child busy with one long message (a bastion's handshake, say) until ``release`` is set."""

    use_daemon_thread = True

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self._release = release

    def on_receive(self, message: Any) -> Any:
        self._release.wait(60)


def test_stop_children_that_times_out_still_stops_the_supervisor_and_leaves_no_thread(
    poll: Callable[..., object],
) -> None:
    """Issue 13, item 8: a StopChildren past its deadline must not leave the supervisor running."""
    before = set(threading.enumerate())
    release = threading.Event()
    stuck = [
        ChildSpec(f"stuck{i}", lambda sup: _Stuck.start(release), FAST) for i in range(3)
    ]
    supervisor = Supervisor.start([*children(FAST), *stuck])
    try:
        for index in range(3):
            where(supervisor, f"stuck{index}").tell("work")  # each is busy now
        # One deadline for all three stuck children: the answer comes, it does not time out.
        supervisor.ask(StopChildren(0.3), timeout=TIMEOUT)
        poll(lambda: not supervisor.is_alive(), what="the supervisor to stop itself")
    finally:
        release.set()  # the stuck children finish their message, then their queued stop
    poll(lambda: set(threading.enumerate()) <= before, what="every actor thread to end")
