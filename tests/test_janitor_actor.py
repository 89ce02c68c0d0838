"""The Janitor actor, spoken to with messages only: ticks, sweeps, extra rounds, crash."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

import pykka
import pytest

from enginehouse.actors.janitor import Janitor
from enginehouse.messages.janitor import GetJanitorStats, JanitorStats, Tick
from enginehouse.messages.registry import Sweep
from enginehouse.messages.supervision import ChildExited, Deliver

TIMEOUT = 10.0


def start_janitor(supervisor: pykka.ActorRef[Any], **kw: Any) -> pykka.ActorRef[Any]:
    args: dict[str, Any] = {
        "interval": 60.0, "idle_timeout": 5.0, "max_engines": 4, "ask_timeout": TIMEOUT, **kw
    }
    return Janitor.start(supervisor, **args)


def ask(ref: pykka.ActorRef[Any], message: object) -> Any:
    return ref.ask(message, timeout=TIMEOUT)


def sweeps(recorder: pykka.ActorRef[Any]) -> list[Any]:
    seen = ask(recorder, "seen")
    return [m.message for m in seen if isinstance(m, Deliver) and m.name == "registry"]


def test_unscheduled_tick_forwards_one_sweep(recorder: pykka.ActorRef[Any]) -> None:
    janitor = start_janitor(recorder)
    try:
        janitor.tell(Tick(scheduled=False))
        stats: JanitorStats = ask(janitor, GetJanitorStats())
        assert stats.rounds == 1 and stats.last_round_at is not None
        found = sweeps(recorder)
        assert len(found) == 1
        assert isinstance(found[0], Sweep)
        assert (found[0].idle_timeout, found[0].max_engines) == (5.0, 4)
    finally:
        janitor.stop()


def test_timer_ticks_every_interval_and_runs_extra_rounds(
    recorder: pykka.ActorRef[Any], poll: Callable[..., object]
) -> None:
    calls = itertools.count()
    janitor = start_janitor(recorder, interval=0.02, rounds=[lambda: next(calls)])
    try:
        poll(lambda: ask(janitor, GetJanitorStats()).rounds >= 3)
        poll(lambda: len(sweeps(recorder)) >= 3)
        assert int(repr(calls)[6:-1]) >= 3
    finally:
        janitor.stop()


def test_stop_leaves_no_timer_thread(
    recorder: pykka.ActorRef[Any], poll: Callable[..., object]
) -> None:
    before = set(threading.enumerate())
    janitor = start_janitor(recorder, interval=0.01)
    poll(lambda: ask(janitor, GetJanitorStats()).rounds >= 2)
    janitor.stop(block=True, timeout=TIMEOUT)
    poll(lambda: set(threading.enumerate()) <= before, what="janitor threads to end")
    rounds_at_stop = len(sweeps(recorder))
    assert rounds_at_stop >= 2


def test_unknown_tell_crashes_and_reports_to_supervisor(
    recorder: pykka.ActorRef[Any], poll: Callable[..., object]
) -> None:
    before = set(threading.enumerate())
    janitor = start_janitor(recorder, interval=0.05)
    janitor.tell(object())
    exited = poll(
        lambda: [m for m in ask(recorder, "seen") if isinstance(m, ChildExited)]
    )
    assert isinstance(exited, list)
    assert exited[0].name == "janitor" and exited[0].urn == janitor.actor_urn
    assert "TypeError" in exited[0].reason
    poll(lambda: not janitor.is_alive())
    poll(lambda: set(threading.enumerate()) <= before, what="the dead janitor's timer to go")


def test_unknown_ask_goes_to_the_caller(recorder: pykka.ActorRef[Any]) -> None:
    janitor = start_janitor(recorder)
    try:
        with pytest.raises(TypeError):
            janitor.ask("bogus", timeout=TIMEOUT)
        assert janitor.is_alive()
    finally:
        janitor.stop()


def test_a_failing_round_does_not_stop_the_janitor(
    recorder: pykka.ActorRef[Any], poll: Callable[..., object]
) -> None:
    calls = itertools.count()

    def faulty() -> None:
        raise RuntimeError("round failed")

    janitor = start_janitor(recorder, interval=0.02, rounds=[faulty, lambda: next(calls)])
    try:
        poll(lambda: ask(janitor, GetJanitorStats()).rounds >= 3)
        assert janitor.is_alive()
        assert int(repr(calls)[6:-1]) >= 3  # the round after the faulty one still runs
        assert len(sweeps(recorder)) >= 3
        assert not [m for m in ask(recorder, "seen") if isinstance(m, ChildExited)]
    finally:
        janitor.stop()


def test_tunnel_health_round_never_asks_the_supervisor(recorder: pykka.ActorRef[Any]) -> None:
    """Issue 13, item 8: the round is a tell through the supervisor (Deliver), never an ask."""
    from enginehouse.actors.tunnel_directory import TunnelHealthRound
    from enginehouse.messages.tunnel import CheckHealth

    TunnelHealthRound(recorder)()
    seen = ask(recorder, "seen")
    delivered = [m for m in seen if isinstance(m, Deliver) and m.name == "tunnels"]
    assert len(delivered) == 1 and isinstance(delivered[0].message, CheckHealth)
    assert all(isinstance(m, Deliver) for m in seen)  # no WhereIs: nothing waited on it
