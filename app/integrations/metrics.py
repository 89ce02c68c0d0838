"""Prometheus metrics in HikariCP's spirit: pool gauges, acquire timers, lifecycle counters.

Two sources feed one :class:`~prometheus_client.CollectorRegistry`:

- :class:`ManagerCollector` reads ``manager.stats()`` at scrape time (engines,
  pool size / checked out / idle / overflow per database, creations,
  evictions, actor restarts, tunnels and fleet budgets when present), so
  nothing is counted twice and a scrape never races the actors.
- :data:`POOL_EVENTS` times every connection checkout of every engine the
  registry builds (wait histogram, pending gauge, timeouts, usage, physical connections),
  through :data:`enginehouse.actors.registry.ENGINE_HOOKS` and the pool-timing
  helper (:mod:`enginehouse.integrations.pool_timing`). It is process-wide.

Labels carry a database id, an actor name or a bastion (``user@host:port``),
never a URL with a password. Every name is listed in docs/metrics.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

from enginehouse.actors.registry import ENGINE_HOOKS, pool_max_connections
from enginehouse.integrations import pool_timing
from enginehouse.integrations.pool_timing import PoolSink
from enginehouse.messages.registry import EnginePlan

log = logging.getLogger("enginehouse.metrics")

PREFIX = "enginehouse"
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
USAGE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300)


class StatsSource(Protocol):
    """Anything with ``stats()``: an :class:`~app.EngineManager` or ``app.engines``."""

    def stats(self) -> Any: ...


class PoolEvents(Collector):
    """Pool timers and counters of every engine built in this process, labelled by database id.

    HikariCP's set: acquire (wait) and usage timers, a creation timer,
    pending threads, timeouts, invalidations, connections opened. Under
    prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set
    before the first import) these values live in the shared directory and
    every worker's are summed at scrape time (:func:`registry_for`).

    Series of a database whose engines are all gone are removed at the next
    scrape (engines are tracked weakly), so a dropped database leaves no
    stale series behind.
    """

    def __init__(self) -> None:
        self.wait = Histogram(
            f"{PREFIX}_pool_wait_seconds",
            "Time to acquire a connection from the pool (includes connecting when the pool grows)",
            ["database"], buckets=WAIT_BUCKETS, registry=None,
        )
        self.usage = Histogram(
            f"{PREFIX}_pool_usage_seconds", "Time a connection stayed checked out",
            ["database"], buckets=USAGE_BUCKETS, registry=None,
        )
        self.creation = Histogram(
            f"{PREFIX}_pool_connection_creation_seconds",
            "Time to open one physical DBAPI connection (driver connect, through any tunnel)",
            ["database"], buckets=WAIT_BUCKETS, registry=None,
        )
        self.timeouts = Counter(
            f"{PREFIX}_pool_timeouts", "Checkouts that gave up after pool_timeout",
            ["database"], registry=None,
        )
        self.invalidations = Counter(
            f"{PREFIX}_pool_invalidations",
            "Pooled connections invalidated (disconnects, pre-ping failures, shed, soft)",
            ["database"], registry=None,
        )
        self.pending = Gauge(
            f"{PREFIX}_pool_pending",
            "Threads waiting for a connection right now (HikariCP: PendingThreads)",
            ["database"], registry=None, multiprocess_mode="livesum",
        )
        self.connections = Counter(
            f"{PREFIX}_pool_connections_opened", "Physical DBAPI connections opened",
            ["database"], registry=None,
        )
        # Event-driven gauges (HikariCP: active, total, max): unlike the stats()-based
        # pool gauges they add up across worker processes in multiprocess mode.
        self.active = Gauge(
            f"{PREFIX}_pool_active_connections", "Connections checked out right now",
            ["database"], registry=None, multiprocess_mode="livesum",
        )
        self.open = Gauge(
            f"{PREFIX}_pool_open_connections",
            "Physical connections open right now (checked out or idle in a pool)",
            ["database"], registry=None, multiprocess_mode="livesum",
        )
        self.max = Gauge(
            f"{PREFIX}_pool_max_connections",
            "Most connections the database's live pools may open (bounded pools)",
            ["database"], registry=None, multiprocess_mode="livesum",
        )
        self._engines: dict[str, weakref.WeakSet[Engine]] = {}

    def metrics(self) -> tuple[Any, ...]:
        return (self.wait, self.usage, self.creation, self.timeouts, self.invalidations,
                self.pending, self.connections, self.active, self.open, self.max)

    def collect(self) -> Iterable[Metric]:
        self.drop_gone()
        for metric in self.metrics():
            yield from metric.collect()

    def drop_gone(self) -> list[str]:
        """Remove the series of databases none of whose engines is alive any more."""
        gone = [label for label, engines in list(self._engines.items()) if not len(engines)]
        for label in gone:
            self._engines.pop(label, None)
            for metric in self.metrics():
                with contextlib.suppress(KeyError):
                    metric.remove(label)
        return gone

    def instrument(self, engine: Engine, plan: EnginePlan) -> None:
        """Time ``engine``'s checkouts and connects (an :data:`ENGINE_HOOKS` hook)."""
        label = str(plan.database_id)
        self._engines.setdefault(label, weakref.WeakSet()).add(engine)
        bound = pool_max_connections(engine.pool, plan)
        if bound is not None:
            most = self.max.labels(label)
            most.inc(bound)
            weakref.finalize(engine, most.dec, bound).atexit = False
        pool_timing.instrument(engine, _PrometheusSink(self, label))


class _PrometheusSink(PoolSink):
    """One database's pool telemetry as :class:`PoolEvents`' series (children bound once)."""

    def __init__(self, events: PoolEvents, label: str) -> None:
        self._wait = events.wait.labels(label)
        self._timeouts = events.timeouts.labels(label)
        self._pending = events.pending.labels(label)
        self._connections = events.connections.labels(label)
        self._creation = events.creation.labels(label)
        self._usage = events.usage.labels(label)
        self._invalidations = events.invalidations.labels(label)
        self._active = events.active.labels(label)
        self._open = events.open.labels(label)

    def waiting(self) -> None:
        self._pending.inc()

    def acquired(self, seconds: float) -> None:
        self._pending.dec()
        self._wait.observe(seconds)

    def timed_out(self) -> None:
        self._timeouts.inc()

    def opened(self, seconds: float | None) -> None:
        self._connections.inc()
        self._open.inc()
        if seconds is not None:
            self._creation.observe(seconds)

    def checked_out(self) -> None:
        self._active.inc()

    def checked_in(self, seconds: float) -> None:
        self._active.dec()
        self._usage.observe(seconds)

    def invalidated(self) -> None:
        self._invalidations.inc()

    def soft_invalidated(self) -> None:
        self._invalidations.inc()

    def closed(self) -> None:
        self._open.dec()


POOL_EVENTS = PoolEvents()
"""The process-wide checkout timers (enabled by :func:`enable_pool_events`)."""


def enable_pool_events() -> PoolEvents:
    """Instrument every engine built from now on (idempotent)."""
    if POOL_EVENTS.instrument not in ENGINE_HOOKS:
        ENGINE_HOOKS.append(POOL_EVENTS.instrument)
    return POOL_EVENTS


def disable_pool_events() -> None:
    """Stop instrumenting new engines (those already built keep their timers)."""
    while POOL_EVENTS.instrument in ENGINE_HOOKS:
        ENGINE_HOOKS.remove(POOL_EVENTS.instrument)


class ManagerCollector(Collector):
    """Reads ``source.stats()`` at each scrape and turns it into metric families."""

    def __init__(self, source: StatsSource, *, pools: bool = True) -> None:
        self._source = source
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        up = GaugeMetricFamily(f"{PREFIX}_up", "1 when the manager answered stats()")
        try:
            stats = self._source.stats()
        except Exception as exc:  # a scrape must answer even when the manager is down
            log.warning("stats() failed during a scrape: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _counters(stats)
        if self._pools:
            yield from _pools(stats)
        yield from _actors(stats)
        yield from _tunnels(stats)
        yield from _fleet(stats)
        yield from _leaks(stats)
        scrape = GaugeMetricFamily(
            f"{PREFIX}_scrape_duration_seconds", "Time this scrape spent reading stats()"
        )
        scrape.add_metric([], time.perf_counter() - started)
        yield scrape


def _counters(stats: Any) -> Iterator[Metric]:
    for name, field, doc in (
        ("engine_creations", "created", "Cached engines built"),
        ("engine_uncached_creations", "uncached_created", "Engines built in NEW mode"),
        ("engine_evictions", "evictions", "Engines evicted (idle or LRU bound)"),
        ("engine_disposals", "disposals", "Cached engines disposed, for any reason"),
        ("cache_hits", "hits", "get() calls served from the snapshot"),
        ("cache_misses", "misses", "get() calls that built or looked up in the registry"),
    ):
        counter = CounterMetricFamily(f"{PREFIX}_{name}", doc)
        counter.add_metric([], float(getattr(stats, field, 0) or 0))
        yield counter


_POOL_GAUGES = (
    ("pool_size", "size", "Configured pool size (QueuePool pool_size)"),
    ("pool_checked_out", "checked_out", "Connections in use (HikariCP: active)"),
    ("pool_checked_in", "checked_in", "Idle connections in the pool (HikariCP: idle)"),
    ("pool_overflow", "overflow", "Connections beyond pool_size (negative: not yet opened)"),
    ("pool_connections_max", "max_connections",
     "Most connections the pools may open (HikariCP: max; bounded pools only)"),
)


def _pools(stats: Any) -> Iterator[Metric]:
    engines = GaugeMetricFamily(f"{PREFIX}_engines", "Cached engines", labels=["database"])
    totals: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    for engine in getattr(stats, "engines", ()) or ():
        database = str(engine.database_id)
        counts[database] = counts.get(database, 0) + 1
        row = totals.setdefault(database, {})
        for _, field, _doc in _POOL_GAUGES:
            value = getattr(engine, field, None)
            if value is not None:  # pools that cannot report a number are left out
                row[field] = row.get(field, 0.0) + float(value)
    for database, count in sorted(counts.items()):
        engines.add_metric([database], count)
    yield engines
    for name, field, doc in _POOL_GAUGES:
        gauge = GaugeMetricFamily(
            f"{PREFIX}_{name}", doc + ", summed over the database's engines", labels=["database"]
        )
        for database, row in sorted(totals.items()):
            if field in row:
                gauge.add_metric([database], row[field])
        yield gauge


def _leaks(stats: Any) -> Iterator[Metric]:
    """Leak detection (``leak_detection_threshold``): reported leaks and current long holders."""
    leaks = CounterMetricFamily(
        f"{PREFIX}_connection_leaks",
        "Connections reported as suspected leaks (checked out past leak_detection_threshold)",
        labels=["database"],
    )
    for database, count in sorted((getattr(stats, "leaks", None) or {}).items()):
        leaks.add_metric([str(database)], float(count))
    yield leaks
    holders = GaugeMetricFamily(
        f"{PREFIX}_connection_long_holders",
        "Connections checked out longer than leak_detection_threshold right now",
        labels=["database"],
    )
    counts: dict[str, int] = {}
    for holder in getattr(stats, "long_holders", None) or ():
        counts[str(holder.database_id)] = counts.get(str(holder.database_id), 0) + 1
    for database, count in sorted(counts.items()):
        holders.add_metric([database], count)
    yield holders


def _actors(stats: Any) -> Iterator[Metric]:
    up = GaugeMetricFamily(f"{PREFIX}_actor_up", "1 when the actor is alive", labels=["actor"])
    restarts = CounterMetricFamily(
        f"{PREFIX}_actor_restarts", "Restarts by the supervisor", labels=["actor"]
    )
    for actor in getattr(stats, "actors", ()) or ():
        up.add_metric([actor.name], 1 if actor.alive and not actor.gave_up else 0)
        restarts.add_metric([actor.name], float(actor.restarts))
    yield up
    yield restarts


def _tunnels(stats: Any) -> Iterator[Metric]:
    tunnels = getattr(stats, "tunnels", None)
    if tunnels is None:
        return
    up = GaugeMetricFamily(
        f"{PREFIX}_tunnel_up", "1 when the bastion's SSH session is connected", labels=["bastion"]
    )
    state = GaugeMetricFamily(
        f"{PREFIX}_tunnel_state", "1 for the session's current state", labels=["bastion", "state"]
    )
    forwards = GaugeMetricFamily(
        f"{PREFIX}_tunnel_forwards", "Local forwards open on the session", labels=["bastion"]
    )
    channels = GaugeMetricFamily(
        f"{PREFIX}_tunnel_active_channels", "Forwarded channels open now", labels=["bastion"]
    )
    connects = CounterMetricFamily(
        f"{PREFIX}_tunnel_connects", "SSH sessions opened", labels=["bastion"]
    )
    restarts = CounterMetricFamily(
        f"{PREFIX}_tunnel_restarts", "SSH sessions reopened after a failure", labels=["bastion"]
    )
    failures = CounterMetricFamily(
        f"{PREFIX}_tunnel_channel_failures", "Forwarded channels that failed", labels=["bastion"]
    )
    for tunnel in tunnels:
        bastion = str(_get(tunnel, "bastion", "?"))
        current = str(_get(tunnel, "state", "unknown"))
        up.add_metric([bastion], 1 if current == "connected" else 0)
        state.add_metric([bastion, current], 1)
        opened = _get(tunnel, "forwards", ()) or ()
        forwards.add_metric([bastion], len(opened))
        channels.add_metric([bastion], sum(_get(f, "active_channels", 0) or 0 for f in opened))
        failures.add_metric([bastion], sum(_get(f, "channel_failures", 0) or 0 for f in opened))
        connects.add_metric([bastion], float(_get(tunnel, "connects", 0) or 0))
        restarts.add_metric([bastion], float(_get(tunnel, "restarts", 0) or 0))
    yield from (up, state, forwards, channels, connects, restarts, failures)


# BudgetStats fields (issue 5): one budget per database ("db:<id>") or bastion ("ssh:<bastion>").
_BUDGET_FIELDS = (
    ("budget_cap", "cap", "gauge", "Connections (or SSH sessions) allowed at once"),
    ("budget_held", "held", "gauge", "Leases this process holds"),
    ("budget_waiting", "waiting", "gauge", "Checkouts of this process waiting for a lease"),
    ("budget_granted", "granted", "counter", "Leases granted to this process"),
    ("budget_timeouts", "timeouts", "counter", "Waits that ended in PoolExhaustedError"),
    ("budget_shed", "shed", "counter", "Idle pooled connections closed so others could proceed"),
    ("budget_round_trips", "round_trips", "counter", "Redis round trips for leases"),
    ("budget_blocking_waits", "blocking_waits", "counter",
     "Blocking waits for a permit (in Redis, or on the process's ledger)"),
    ("budget_empty_waits", "empty_waits", "counter",
     "Blocking waits that ended without a permit (the budget stayed full)"),
    ("budget_refusals", "refusals", "counter",
     "First asks for a permit that the fleet (or the process's ledger) refused"),
    ("budget_handovers", "handovers", "counter",
     "Permits a closing connection passed to a waiter of this process"),
    ("budget_demand_news", "demand_news", "counter",
     "Renewals made at once because another process started or stopped waiting (pub/sub)"),
    ("budget_fleet_held", "fleet_held", "gauge", "Leases held fleet-wide (last renewal)"),
    ("budget_fleet_waiting", "fleet_waiting", "gauge", "Waiters fleet-wide (last renewal)"),
    ("budget_fleet_processes", "fleet_processes", "gauge", "Processes sharing the budget"),
)


def _fleet(stats: Any) -> Iterator[Metric]:
    budgets = getattr(stats, "budgets", None)
    if budgets is None:
        return
    mode = GaugeMetricFamily(
        f"{PREFIX}_budget_mode",
        "1 for the budget's mode (embedded, fleet, local fallback)",
        labels=["budget", "mode"],
    )
    trips = CounterMetricFamily(
        f"{PREFIX}_budget_redis_round_trips",
        "Redis round trips for leases, by purpose (acquire, release, renew)",
        labels=["budget", "kind"],
    )
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
    for name, _field, kind, doc in _BUDGET_FIELDS:
        family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
        families[name] = family(f"{PREFIX}_{name}", doc, labels=["budget"])
    for budget in budgets:
        key = str(_get(budget, "key", "?"))
        mode.add_metric([key, str(_get(budget, "mode", "unknown"))], 1)
        for purpose in ("acquire", "release", "renew"):
            trips.add_metric([key, purpose], float(_get(budget, f"{purpose}_round_trips", 0) or 0))
        for name, field, _kind, _doc in _BUDGET_FIELDS:
            value = _get(budget, field)
            if isinstance(value, int | float) and not isinstance(value, bool):
                families[name].add_metric([key], float(value))  # None: not in fleet mode
    yield mode
    yield trips
    yield from families.values()


def _get(item: Any, name: str, default: Any = None) -> Any:
    if isinstance(item, dict):
        return item.get(name, default)
    return getattr(item, name, default)


def multiprocess_dir() -> str | None:
    """prometheus_client's shared directory when its multiprocess mode is on, else None."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")  # noqa: SIM112 (its legacy name)


def registry_for(source: StatsSource, *, pool_events: bool = True) -> CollectorRegistry:
    """A new registry exposing ``source``'s stats (and the pool timers and gauges).

    In prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set
    before the first import, as gunicorn and Celery deployments do) the pool
    metrics of every worker process are summed from the shared directory, and
    ``source``'s stats add what only this process knows (actors, tunnels,
    budgets, leaks): its per-pool gauges would be one worker's numbers, so
    the summed event gauges (active, open, max, pending) stand in for them.
    """
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir() is None:
        registry.register(ManagerCollector(source))
        if pool_events:
            registry.register(enable_pool_events())
        return registry
    from prometheus_client import multiprocess

    multiprocess.MultiProcessCollector(registry)
    registry.register(ManagerCollector(source, pools=False))
    if pool_events:
        enable_pool_events()  # this process's engines write into the shared directory
    return registry


def mark_process_dead(pid: int | None = None) -> None:
    """Drop a finished worker's live gauges from the shared directory (multiprocess mode).

    Called by the gunicorn ``child_exit`` and Celery process-shutdown hooks of
    :mod:`enginehouse.integrations.workers`; a no-op when the mode is off.
    """
    if multiprocess_dir() is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(os.getpid() if pid is None else pid)


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint; ``stop()`` closes it."""

    addr: str
    port: int
    registry: CollectorRegistry
    _shutdown: Callable[[], None]

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/metrics"

    def stop(self) -> None:
        self._shutdown()


def start_metrics_server(
    source: StatsSource, port: int = 9464, addr: str = "127.0.0.1", *, pool_events: bool = True
) -> MetricsServer:
    """Serve ``source``'s metrics over HTTP (``port=0``: any free port); loopback by default.

    ``pool_events=False`` leaves out the checkout timers (and their cost per checkout).
    """
    registry = registry_for(source, pool_events=pool_events)
    server, thread = start_http_server(port, addr=addr, registry=registry)

    def shutdown() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    bound = int(server.server_address[1])
    log.info("metrics endpoint on http://%s:%d/metrics", addr, bound)
    return MetricsServer(addr, bound, registry, shutdown)
