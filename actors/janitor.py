"""The Janitor actor: the system's only timer.

Every ``interval`` seconds it sends the registry a :class:`Sweep` (evict idle
engines, enforce the LRU bound) and runs any extra rounds registered with it
(tunnel health checks, lease renewal). It arms its next tick with a
``threading.Timer`` that only ``tell``s the Janitor itself, so all work
happens on the actor's thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pykka

from enginehouse.actors.supervisor import report_crash
from enginehouse.messages.janitor import GetJanitorStats, JanitorStats, Tick
from enginehouse.messages.registry import Sweep
from enginehouse.messages.supervision import Deliver

log = logging.getLogger("enginehouse.janitor")

Round = Callable[[], None]
"""An extra task run on every tick; it must be quick and must not raise."""


class Janitor(pykka.ThreadingActor):
    """Sends periodic sweeps; see the module docstring."""

    use_daemon_thread = True

    def __init__(
        self,
        supervisor: pykka.ActorRef[Any],
        *,
        interval: float,
        idle_timeout: float,
        max_engines: int,
        ask_timeout: float,
        rounds: Sequence[Round] = (),
        name: str = "janitor",
    ) -> None:
        super().__init__()
        self._supervisor = supervisor
        self._interval = interval
        self._idle_timeout = idle_timeout
        self._max_engines = max_engines
        self._ask_timeout = ask_timeout
        self._rounds = tuple(rounds)
        self._name = name
        self._timer: threading.Timer | None = None
        self._count = 0
        self._last: float | None = None

    def on_start(self) -> None:
        self._arm()

    def on_stop(self) -> None:
        self._disarm()

    def on_failure(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._disarm()
        report_crash(self._supervisor, self._name, self.actor_urn, exc)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Tick):
            return self._tick(message)
        if isinstance(message, GetJanitorStats):
            return JanitorStats(self._count, self._last)
        raise TypeError(f"unexpected message {type(message).__name__}")

    def _tick(self, tick: Tick) -> None:
        try:
            self._sweep()
            for extra in self._rounds:
                try:
                    extra()
                except Exception:  # one faulty round must not stop sweeps (or other rounds)
                    log.exception("janitor round %r failed", extra)
        finally:
            self._count += 1
            self._last = time.time()
            if tick.scheduled:
                self._arm()

    def _sweep(self) -> None:
        # A tell through the supervisor: the Janitor never waits on another actor.
        sweep = Sweep(self._idle_timeout, self._max_engines, time.monotonic())
        try:
            self._supervisor.tell(Deliver("registry", sweep))
        except pykka.ActorDeadError:
            log.warning("sweep skipped: the supervisor is gone")

    def _arm(self) -> None:
        ref = self.actor_ref

        def fire() -> None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(Tick())

        self._timer = threading.Timer(self._interval, fire)
        self._timer.daemon = True
        self._timer.start()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            if self._timer is not threading.current_thread():
                self._timer.join(timeout=1.0)
            self._timer = None
