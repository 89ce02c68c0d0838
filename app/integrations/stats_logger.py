"""Pool timings and counts into a StatsD-style logger (Superset's ``STATS_LOGGER``).

Superset reports its own metrics through ``app.config["STATS_LOGGER"]``, an
object with ``incr(key)``, ``decr(key)``, ``timing(key, seconds)`` and
``gauge(key, value)`` (``superset.stats_logger.BaseStatsLogger``; the StatsD
one sends them on). :func:`feed_stats_logger` sends enginehouse's pool
telemetry there too, for every engine built from then on, without
prometheus_client (timed by :mod:`enginehouse.integrations.pool_timing`, as the
Prometheus series are). Keys carry the database id, never a URL or a user:

- ``enginehouse.pool.<db>.acquire`` (timing): getting a connection from the pool
- ``enginehouse.pool.<db>.usage`` (timing): how long it stayed checked out
- ``enginehouse.pool.<db>.creation`` (timing): opening one physical connection
- ``enginehouse.pool.<db>.timeout`` (incr): a checkout that gave up after pool_timeout
- ``enginehouse.pool.<db>.invalidated`` (incr): a connection invalidated
- ``enginehouse.pool.<db>.active`` (incr/decr): checked out now
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy.engine import Engine

from enginehouse.actors.registry import ENGINE_HOOKS
from enginehouse.integrations import pool_timing
from enginehouse.integrations.pool_timing import PoolSink
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
        pool_timing.instrument(
            engine, _StatsLoggerSink(_Safe(self.logger), f"{self.prefix}.{plan.database_id}")
        )


class _StatsLoggerSink(PoolSink):
    """One database's pool telemetry as ``STATS_LOGGER`` keys under ``key``."""

    stamp = "enginehouse.stats_logger"

    def __init__(self, send: _Safe, key: str) -> None:
        self._send = send
        self._acquire, self._timeout = f"{key}.acquire", f"{key}.timeout"
        self._creation, self._active = f"{key}.creation", f"{key}.active"
        self._usage, self._invalidated = f"{key}.usage", f"{key}.invalidated"

    def acquired(self, seconds: float) -> None:
        self._send.timing(self._acquire, seconds)

    def timed_out(self) -> None:
        self._send.incr(self._timeout)

    def opened(self, seconds: float | None) -> None:
        if seconds is not None:
            self._send.timing(self._creation, seconds)

    def checked_out(self) -> None:
        self._send.incr(self._active)

    def checked_in(self, seconds: float) -> None:
        self._send.decr(self._active)
        self._send.timing(self._usage, seconds)

    def invalidated(self) -> None:
        self._send.incr(self._invalidated)


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
