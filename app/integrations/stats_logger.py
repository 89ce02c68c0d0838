"""Pool timings and counts into a StatsD-style logger (Superset's ``STATS_LOGGER``).

Superset reports its own metrics through ``app.config["STATS_LOGGER"]``, an
object with ``incr(key)``, ``decr(key)``, ``timing(key, seconds)`` and
``gauge(key, value)`` (``superset.stats_logger.BaseStatsLogger``; the StatsD
one sends them on). :func:`feed_stats_logger` sends enginehouse's pool
telemetry there too, for every engine built from then on, without
prometheus_client. Keys carry the database id, never a URL or a user:

- ``enginehouse.pool.<db>.acquire`` (timing): getting a connection from the pool
- ``enginehouse.pool.<db>.usage`` (timing): how long it stayed checked out
- ``enginehouse.pool.<db>.creation`` (timing): opening one physical connection
- ``enginehouse.pool.<db>.timeout`` (incr): a checkout that gave up after pool_timeout
- ``enginehouse.pool.<db>.invalidated`` (incr): a connection invalidated
- ``enginehouse.pool.<db>.active`` (incr/decr): checked out now
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from enginehouse.actors.registry import ENGINE_HOOKS
from enginehouse.errors import PoolExhaustedError
from enginehouse.messages.registry import EnginePlan

log = logging.getLogger("enginehouse.stats_logger")


class StatsLogger(Protocol):
    """What Superset's ``BaseStatsLogger`` offers (and what we call)."""

    def incr(self, key: str) -> None: ...

    def decr(self, key: str) -> None: ...

    def timing(self, key: str, value: float) -> None: ...


class StatsLoggerFeed:
    """An :data:`ENGINE_HOOKS` hook sending one engine's pool telemetry to ``logger``."""

    def __init__(self, logger: StatsLogger, prefix: str = "enginehouse.pool") -> None:
        self.logger = logger
        self.prefix = prefix

    def instrument(self, engine: Engine, plan: EnginePlan) -> None:
        key = f"{self.prefix}.{plan.database_id}"
        send = _Safe(self.logger)
        engine.raw_connection = _timed_acquire(  # type: ignore[method-assign]
            weakref.WeakMethod(engine.raw_connection), send, key
        )
        connecting: dict[int, float] = {}

        def on_do_connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
            connecting[threading.get_ident()] = time.perf_counter()

        def on_connect(dbapi_connection: Any, record: Any) -> None:
            started = connecting.pop(threading.get_ident(), None)
            if started is not None:
                send.timing(f"{key}.creation", time.perf_counter() - started)

        def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
            record.info["enginehouse.stats_logger"] = time.perf_counter()
            send.incr(f"{key}.active")

        def on_checkin(dbapi_connection: Any, record: Any) -> None:
            started = record.info.pop("enginehouse.stats_logger", None)
            if started is not None:
                send.decr(f"{key}.active")
                send.timing(f"{key}.usage", time.perf_counter() - started)

        def on_invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
            send.incr(f"{key}.invalidated")

        for name, listener in (("do_connect", on_do_connect), ("connect", on_connect),
                               ("checkout", on_checkout), ("checkin", on_checkin),
                               ("invalidate", on_invalidate)):
            event.listen(engine, name, listener)


class _Safe:
    """Calls the logger, swallowing (and logging once) its errors: telemetry never fails a query."""

    def __init__(self, logger: StatsLogger) -> None:
        self._logger = logger
        self._warned = False

    def incr(self, key: str) -> None:
        self._call(self._logger.incr, key)

    def decr(self, key: str) -> None:
        self._call(self._logger.decr, key)

    def timing(self, key: str, seconds: float) -> None:
        self._call(self._logger.timing, key, seconds)

    def _call(self, method: Callable[..., Any], *args: Any) -> None:
        try:
            method(*args)
        except Exception as exc:
            if not self._warned:
                self._warned = True
                log.warning("STATS_LOGGER failed (%s); later failures are not logged",
                            type(exc).__name__)


def _timed_acquire(acquire: weakref.WeakMethod[Callable[[], Any]], send: _Safe,
                   key: str) -> Callable[[], Any]:
    def timed_raw_connection() -> Any:
        method = acquire()
        if method is None:
            raise ReferenceError("engine already collected")
        start = time.perf_counter()
        try:
            return method()
        except (sa_exc.TimeoutError, PoolExhaustedError):
            send.incr(f"{key}.timeout")
            raise
        finally:
            send.timing(f"{key}.acquire", time.perf_counter() - start)

    return timed_raw_connection


def feed_stats_logger(logger: StatsLogger, prefix: str = "enginehouse.pool") -> StatsLoggerFeed:
    """Send the pool telemetry of every engine built from now on to ``logger``.

    Returns the hook; :func:`stop_feeding` removes it (engines already built keep theirs).
    """
    feed = StatsLoggerFeed(logger, prefix)
    ENGINE_HOOKS.append(feed.instrument)
    return feed


def stop_feeding(feed: StatsLoggerFeed) -> None:
    """Stop instrumenting new engines for ``feed``."""
    while feed.instrument in ENGINE_HOOKS:
        ENGINE_HOOKS.remove(feed.instrument)
