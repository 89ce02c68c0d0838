"""One pool-timing helper for every telemetry sink (Prometheus, Superset's ``STATS_LOGGER``).

:func:`instrument` times an engine's checkouts and physical connects and
reports each step to a :class:`PoolSink`. Everything but the wait for a
checkout comes from SQLAlchemy's pool events (``do_connect`` -> ``connect``,
``checkout`` -> ``checkin``, ``invalidate``, ``close``); no pool event fires
*before* a checkout, so that wait alone is timed by wrapping
``engine.raw_connection`` (weakly: instrumenting makes no reference cycle, and
a forgotten engine is freed at once).

A sink overrides only the steps it reports; steps it leaves alone get no
listener at all, so they cost nothing per checkout.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from enginehouse.errors import PoolExhaustedError

_clock = time.perf_counter


class PoolSink:
    """Where one engine's pool telemetry goes: template methods, all no-ops here.

    ``stamp`` names the pool record's ``info`` entry holding the checkout time
    (one per sink, so two sinks on one engine never read each other's).
    """

    stamp = "enginehouse.checkout"

    def waiting(self) -> None:
        """A checkout started (it may wait for, or open, a connection)."""

    def acquired(self, seconds: float) -> None:
        """A checkout ended, successfully or not, after ``seconds``."""

    def timed_out(self) -> None:
        """A checkout gave up after ``pool_timeout`` (or its budget's)."""

    def opened(self, seconds: float | None) -> None:
        """A physical connection was opened (in ``seconds``, when its start was seen)."""

    def checked_out(self) -> None:
        """A connection left the pool."""

    def checked_in(self, seconds: float) -> None:
        """A connection came back after ``seconds`` out."""

    def invalidated(self) -> None:
        """A pooled connection was invalidated (a disconnect, a failed pre-ping, shed)."""

    def soft_invalidated(self) -> None:
        """A pooled connection was soft-invalidated (replaced at its next checkout)."""

    def closed(self) -> None:
        """A physical connection was closed."""


def instrument(engine: Engine, sink: PoolSink) -> None:
    """Report ``engine``'s checkouts and connects to ``sink`` (see the module docstring)."""
    engine.raw_connection = _timed_checkout(  # type: ignore[method-assign]
        weakref.WeakMethod(engine.raw_connection), sink
    )
    # Pool-level listeners on the engine: they move with its pool across
    # dispose()/recreate() and keep the statement path free of engine events.
    for name, listener in _listeners(sink).items():
        event.listen(engine, name, listener)


def _overrides(sink: PoolSink, step: str) -> bool:
    return getattr(type(sink), step) is not getattr(PoolSink, step)


def _timed_checkout(
    acquire: weakref.WeakMethod[Callable[[], Any]], sink: PoolSink
) -> Callable[[], Any]:
    """``engine.raw_connection`` reporting how long each checkout took."""
    waiting, acquired, timed_out = sink.waiting, sink.acquired, sink.timed_out

    def timed_raw_connection() -> Any:
        method = acquire()
        if method is None:
            raise ReferenceError("engine already collected")
        start = _clock()
        waiting()
        try:
            return method()
        except (sa_exc.TimeoutError, PoolExhaustedError):  # the budget raises the latter
            timed_out()
            raise
        finally:
            acquired(_clock() - start)

    return timed_raw_connection


def _listeners(sink: PoolSink) -> dict[str, Callable[..., None]]:
    """The pool (and dialect ``do_connect``) listeners for the steps ``sink`` overrides."""
    stamp = sink.stamp
    connecting: dict[int, float] = {}  # thread id -> when its connect started
    opened, checked_out, checked_in = sink.opened, sink.checked_out, sink.checked_in
    invalidated, soft_invalidated, closed = sink.invalidated, sink.soft_invalidated, sink.closed

    def on_do_connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        connecting[threading.get_ident()] = _clock()

    def on_connect(dbapi_connection: Any, record: Any) -> None:
        started = connecting.pop(threading.get_ident(), None)
        opened(None if started is None else _clock() - started)

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        record.info[stamp] = _clock()
        checked_out()

    def on_checkin(dbapi_connection: Any, record: Any) -> None:
        started = record.info.pop(stamp, None)
        if started is not None:
            checked_in(_clock() - started)

    def on_invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
        invalidated()

    def on_soft_invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
        soft_invalidated()

    def on_close(dbapi_connection: Any, record: Any = None) -> None:
        closed()

    listeners: dict[str, Callable[..., None]] = {}
    if _overrides(sink, "opened"):
        listeners |= {"do_connect": on_do_connect, "connect": on_connect}
    if _overrides(sink, "checked_out") or _overrides(sink, "checked_in"):
        listeners |= {"checkout": on_checkout, "checkin": on_checkin}
    if _overrides(sink, "invalidated"):
        listeners["invalidate"] = on_invalidate
    if _overrides(sink, "soft_invalidated"):
        listeners["soft_invalidate"] = on_soft_invalidate
    if _overrides(sink, "closed"):
        listeners |= {"close": on_close, "close_detached": on_close}
    return listeners
