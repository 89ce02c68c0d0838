"""Leak detection: connections checked out longer than ``leak_detection_threshold``.

HikariCP's ``leakDetectionThreshold``, for every engine the manager builds.
At checkout the :class:`LeakDetector` notes when, on which thread, for which
database and request ``source``, and where: the caller's stack as
``file:line in function`` frames only (never locals or arguments, so never a
secret). At check-in it forgets. The Janitor's round calls :meth:`scan`: each
checkout past the threshold is logged once, as a WARNING with that stack, and
counted; :meth:`long_holders` lists those still out (``stats().long_holders``).

Off by default: taking a stack costs some microseconds per checkout. The
checkout notes live in a plain dict keyed by the pool's connection record;
one store at checkout, one pop at check-in, both atomic in CPython.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from enginehouse.messages.registry import EnginePlan
from enginehouse.shares import request_source

__all__ = ["Checkout", "LeakDetector", "LongHolder", "request_source"]

log = logging.getLogger("enginehouse.leaks")

STACK_FRAMES = 12
"""How many of the caller's frames a checkout keeps (innermost last)."""

_SKIPPED_MODULES = ("sqlalchemy", "enginehouse", "contextlib")
"""Frames of these modules are plumbing, not the caller's code."""


@dataclass
class Checkout:
    """One connection out of its pool: who took it, when and from where."""

    database_id: int | str
    source: str | None
    thread: str
    since: float
    stack: str
    reported: bool = False


@dataclass(frozen=True)
class LongHolder:
    """A connection checked out longer than the threshold, as ``stats()`` lists it."""

    database_id: int | str
    source: str | None
    age: float
    thread: str


@dataclass
class LeakDetector:
    """Watches checkouts of the manager's engines; see the module docstring."""

    threshold: float
    _out: dict[int, Checkout] = field(default_factory=dict)
    _reported: Counter[int | str] = field(default_factory=Counter)
    _scans: itertools.count[int] = field(default_factory=itertools.count)

    def on_engine_created(self, engine: Engine, plan: EnginePlan) -> None:
        """The registry's hook: listen to the new engine's pool (pool events, not engine ones)."""
        database_id = plan.database_id
        out = self._out

        def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
            out[id(record)] = Checkout(
                database_id,
                request_source.get(),
                threading.current_thread().name,
                time.monotonic(),
                _caller_stack(),
            )

        def on_checkin(dbapi_connection: Any, record: Any) -> None:
            out.pop(id(record), None)

        event.listen(engine.pool, "checkout", on_checkout)
        event.listen(engine.pool, "checkin", on_checkin)

    def scan(self, now: float | None = None) -> int:
        """Warn once about each checkout past the threshold; returns how many were new."""
        now = time.monotonic() if now is None else now
        next(self._scans)
        found = 0
        for checkout in self._out.copy().values():  # dict.copy() is atomic; iterating it is safe
            age = now - checkout.since
            if checkout.reported or age < self.threshold:
                continue
            checkout.reported = True
            self._reported[checkout.database_id] += 1
            found += 1
            log.warning(
                "connection leak suspected: database %s, source %s, thread %s, checked out "
                "%.1fs ago (leak_detection_threshold=%gs), at:\n%s",
                checkout.database_id, checkout.source, checkout.thread, age, self.threshold,
                checkout.stack,
            )
        return found

    def janitor_round(self) -> None:
        """The Janitor's extra round (never raises)."""
        try:
            self.scan()
        except Exception:  # a round must not stop the Janitor
            log.exception("leak scan failed")

    def long_holders(self, now: float | None = None) -> list[LongHolder]:
        """Checkouts older than the threshold right now, oldest first."""
        now = time.monotonic() if now is None else now
        holders = [
            LongHolder(c.database_id, c.source, round(now - c.since, 3), c.thread)
            for c in self._out.copy().values()
            if now - c.since >= self.threshold
        ]
        return sorted(holders, key=lambda h: -h.age)

    def reported(self) -> dict[int | str, int]:
        """Leaks reported so far, per database (the metric's counter)."""
        return dict(self._reported)


def _caller_stack() -> str:
    """The application's frames that led to this checkout, innermost last.

    File, line and function only: no source text, locals or arguments, so a
    secret in the caller's code or data never reaches the log.
    """
    lines: list[str] = []
    frame: FrameType | None = sys._getframe(2)
    while frame is not None and len(lines) < STACK_FRAMES:
        if not str(frame.f_globals.get("__name__", "")).startswith(_SKIPPED_MODULES):
            code = frame.f_code
            lines.append(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}')
        frame = frame.f_back
    return "\n".join(reversed(lines))
