"""The EngineRegistry actor: sole owner of every cached engine.

It builds engines on a miss (one per key even when many callers miss at
once: messages are handled one at a time), disposes them on request,
eviction or shutdown, and after every change publishes an immutable
snapshot that the facade reads on the hit path without a round trip.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
import weakref
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import pykka
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from enginehouse import compat
from enginehouse.actors.counters import count_value
from enginehouse.actors.supervisor import report_crash
from enginehouse.errors import DriverNotInstalledError, EngineCreationError, EngineManagerError
from enginehouse.messages.registry import (
    BuildUncached,
    CachedEngine,
    DisposeAll,
    DisposeDatabase,
    EngineDisposed,
    EnginePlan,
    GetEngine,
    GetStats,
    PoolStatus,
    RegistryStats,
    RequestKey,
    Sweep,
)
from enginehouse.specs import masked_url, url_secrets

log = logging.getLogger("enginehouse.registry")

UrlPreparer = Callable[[EnginePlan], EnginePlan]
"""Rewrites a plan before its engine is built (the SSH tunnel hook)."""

EngineHook = Callable[[Engine, EnginePlan], None]
ENGINE_HOOKS: list[EngineHook] = []
"""Called with every engine built (the metrics integration instruments pools).

A failing hook is logged, never raised."""


class Snapshot:
    """Where the registry publishes its cache: one attribute, replaced whole.

    Readers take ``snapshot.entries`` once and look up in that mapping; the
    registry never mutates a published mapping, it publishes a new one.
    """

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: Mapping[RequestKey, CachedEngine] = MappingProxyType({})


class EngineRegistry(pykka.ThreadingActor):
    """Owns engines; see the module docstring."""

    use_daemon_thread = True

    def __init__(
        self,
        snapshot: Snapshot,
        *,
        max_engines: int,
        supervisor: pykka.ActorRef[Any] | None = None,
        name: str = "registry",
        prepare: UrlPreparer | None = None,
        on_engine_created: EngineHook | None = None,
    ) -> None:
        super().__init__()
        self._on_engine_created = on_engine_created  # the manager's budget hook
        self._snapshot = snapshot
        self._max_engines = max_engines
        self._supervisor = supervisor
        self._name = name
        self._prepare = prepare
        self._entries: dict[str, CachedEngine] = {}
        self._aliases: dict[RequestKey, str] = {}
        self._listeners: dict[str, Callable[[Engine], None]] = {}
        self._fingerprints: dict[int | str, str] = {}
        self._uncached: weakref.WeakSet[Engine] = weakref.WeakSet()
        # Pools of retired engines, disposed once more by the next sweep: a checkin that
        # read "not retired" just before the retirement may have parked a connection there.
        self._retired_pools: weakref.WeakSet[Any] = weakref.WeakSet()
        self._counts = {"misses": 0, "created": 0, "evictions": 0, "disposals": 0, "uncached": 0}
        self._handlers: dict[type, Callable[[Any], Any]] = {
            GetEngine: self._get,
            BuildUncached: self._build_uncached,
            DisposeDatabase: self._dispose_database,
            DisposeAll: self._dispose_all,
            EngineDisposed: self._engine_disposed,
            Sweep: self._sweep,
            GetStats: self._stats,
        }

    # -- lifecycle -------------------------------------------------------------

    def on_start(self) -> None:
        self._publish()
        log.info("registry started")

    def on_stop(self) -> None:
        self._dispose_all(DisposeAll())
        log.info("registry stopped")

    def on_failure(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # State dies with the actor: give the engines' connections back first.
        self._dispose_all(DisposeAll())
        report_crash(self._supervisor, self._name, self.actor_urn, exc)

    def on_receive(self, message: Any) -> Any:
        handler = self._handlers.get(type(message))
        if handler is None:
            # An unknown message is a bug in the sender: crash, let the supervisor restart us.
            raise TypeError(f"unexpected message {type(message).__name__}")
        try:
            return handler(message)
        except EngineManagerError as exc:
            _drop_locals(exc)
            raise

    # -- handlers --------------------------------------------------------------

    def _get(self, message: GetEngine) -> CachedEngine:
        engine_key = self._aliases.get(message.key)
        if engine_key is None:
            engine_key = message.plan.engine_key
            if engine_key not in self._entries:
                self._counts["misses"] += 1
                self._add(message.plan)
            self._aliases[message.key] = engine_key
            self._publish()
        elif message.key not in self._snapshot.entries:
            # A crashed predecessor's late publish (from on_failure) hid it: show it again,
            # or every later get() of this key would take this round trip.
            self._publish()
        entry = self._entries[engine_key]
        entry.last_used = time.monotonic()
        return entry

    def _build_uncached(self, message: BuildUncached) -> Engine:
        engine = self._build(message.plan)
        self._uncached.add(engine)
        self._counts["uncached"] += 1
        return engine

    def _dispose_database(self, message: DisposeDatabase) -> int:
        keys = [k for k, e in self._entries.items() if e.plan.database_id == message.database_id]
        for key in keys:
            self._remove(key)
        self._fingerprints.pop(message.database_id, None)
        self._publish()
        return len(keys)

    def _dispose_all(self, message: DisposeAll) -> int:
        keys = list(self._entries)
        for key in keys:
            self._remove(key)
        for engine in list(self._uncached):
            engine.dispose()
        self._uncached.clear()
        self._publish()
        return len(keys)

    def _engine_disposed(self, message: EngineDisposed) -> None:
        entry = self._entries.get(message.engine_key)
        if entry is not None and id(entry.engine) == message.engine_id:
            log.info("engine of database %s disposed by its user", entry.plan.database_id)
            self._remove(message.engine_key, dispose=False)
            self._publish()

    def _sweep(self, message: Sweep) -> int:
        for pool in list(self._retired_pools):
            try:
                pool.dispose()
            except Exception as exc:  # a connection that fails to close must not stop the sweep
                log.warning("disposing a retired pool failed: %s", type(exc).__name__)
        self._retired_pools.clear()
        idle = [
            key
            for key, entry in self._entries.items()
            if not in_use(entry) and message.now - entry.last_used > message.idle_timeout
        ]
        for key in idle:
            self._remove(key)
            self._counts["evictions"] += 1
        evicted = len(idle) + self._enforce_bound(message.max_engines)
        if evicted:
            log.info("evicted %d engines", evicted)
            self._publish()
        return evicted

    def _stats(self, message: GetStats) -> RegistryStats:
        now = time.monotonic()
        return RegistryStats(
            engines=tuple(_pool_status(entry, now) for entry in self._entries.values()),
            misses=self._counts["misses"],
            created=self._counts["created"],
            evictions=self._counts["evictions"],
            disposals=self._counts["disposals"],
            uncached_created=self._counts["uncached"],
        )

    # -- internals -------------------------------------------------------------

    def _add(self, plan: EnginePlan) -> None:
        """Build first, then retire what the new engine replaces, then bound the cache.

        A build that raises leaves everything as it was: a changed spec whose
        new engine fails keeps the old engines owned (and disposed on shutdown).
        """
        entry = self._cache(plan)
        self._entries[plan.engine_key] = entry
        self._retire_old_versions(plan)
        self._fingerprints[plan.database_id] = plan.fingerprint
        self._enforce_bound(self._max_engines, keep=plan.engine_key)

    def _cache(self, plan: EnginePlan) -> CachedEngine:
        engine = self._build(plan)
        ref = self.actor_ref
        key, engine_id, pid = plan.engine_key, id(engine), os.getpid()

        def on_disposed(_: Engine) -> None:
            if os.getpid() != pid:
                return  # a forked child dropping inherited pools: this actor is not here
            # If the registry that cached it is gone, so is the entry: nothing to tell.
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(EngineDisposed(key, engine_id))

        # Engine.dispose() dispatches engine_disposed itself: statements stay event-free.
        compat.listen_off_the_statement_path(engine, "engine_disposed", on_disposed)
        self._listeners[key] = on_disposed
        entry = CachedEngine(engine=engine, plan=plan)
        track_use(entry)
        log.info("created engine for database %s: %r", plan.database_id, plan)
        return entry

    def _build(self, plan: EnginePlan) -> Engine:
        if self._prepare is not None:
            plan = self._prepare(plan)
        try:
            engine = create_engine(plan.url, **plan.kwargs)
        except EngineManagerError:
            raise
        except (NoSuchModuleError, ImportError) as exc:
            raise DriverNotInstalledError(
                "create_engine",
                f"driver {plan.url.drivername!r} is not installed ({_mask(exc, plan)})",
                database_id=plan.database_id,
            ) from None
        except (ArgumentError, TypeError, ValueError) as exc:
            raise EngineCreationError(
                "create_engine", _mask(exc, plan), database_id=plan.database_id
            ) from None
        self._counts["created"] += 1
        if self._on_engine_created is not None:
            try:
                self._on_engine_created(engine, plan)
            except Exception as exc:  # an engine outside its budget must not be handed out
                engine.dispose()
                raise EngineCreationError(
                    "on_engine_created", _mask(exc, plan), database_id=plan.database_id
                ) from None
        for hook in tuple(ENGINE_HOOKS):
            try:
                hook(engine, plan)
            except Exception as exc:  # instrumentation must never break engine creation
                log.warning("engine hook %s failed: %s", getattr(hook, "__name__", hook), exc)
        return engine

    def _retire_old_versions(self, plan: EnginePlan) -> None:
        """A changed spec (new fingerprint) retires that database's older engines now."""
        previous = self._fingerprints.get(plan.database_id)
        if previous is None or previous == plan.fingerprint:
            return
        stale = [
            key
            for key, entry in self._entries.items()
            if entry.plan.database_id == plan.database_id
            and entry.plan.fingerprint != plan.fingerprint
        ]
        for key in stale:
            self._remove(key)
        log.info("database %s changed: disposed %d old engines", plan.database_id, len(stale))

    def _enforce_bound(self, max_engines: int, keep: str | None = None) -> int:
        """Evict the least recently used engines past ``max_engines``, sparing those in use.

        With every other engine in use the bound is exceeded until a later sweep.
        """
        excess = len(self._entries) - max_engines
        if excess <= 0:
            return 0
        idle = [k for k, e in self._entries.items() if not in_use(e) and k != keep]
        oldest = sorted(idle, key=lambda k: self._entries[k].last_used)[:excess]
        for key in oldest:
            self._remove(key)
            self._counts["evictions"] += 1
        return len(oldest)

    def _remove(self, engine_key: str, *, dispose: bool = True) -> None:
        entry = self._entries.pop(engine_key)
        entry.retired = True  # before dispose: a connection checked in from now on is closed
        for alias in [a for a, k in self._aliases.items() if k == engine_key]:
            del self._aliases[alias]
        listener = self._listeners.pop(engine_key, None)
        if listener is not None and event.contains(entry.engine, "engine_disposed", listener):
            event.remove(entry.engine, "engine_disposed", listener)
        self._retired_pools.add(entry.engine.pool)
        if dispose:
            entry.engine.dispose()
        self._counts["disposals"] += 1

    def _publish(self) -> None:
        entries = {alias: self._entries[key] for alias, key in self._aliases.items()}
        self._snapshot.entries = MappingProxyType(entries)


def track_use(entry: CachedEngine) -> None:
    """Pool listeners: stamp ``last_used`` on each checkin, know which connections are out.

    A pool that counts its checkouts (QueuePool's ``checkedout()``) needs no
    checkout listener, which would cost every checkout SQLAlchemy's fast path
    (+2-3 µs); other pools record each checkout in ``entry.in_use``. Once the
    entry is retired, a connection checked in is closed rather than pooled: a
    checkout racing the engine's disposal never parks a connection in a pool
    the registry no longer tracks.
    """
    out = entry.in_use

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        out[id(record)] = None

    def on_checkin(dbapi_connection: Any, record: Any) -> None:
        out.pop(id(record), None)
        entry.last_used = time.monotonic()
        if entry.retired and dbapi_connection is not None:
            record.invalidate()

    def on_detach(dbapi_connection: Any, record: Any) -> None:
        out.pop(id(record), None)  # the caller owns it now; the pool never sees it again

    # On the pool, not the engine (that would set the engine's _has_events and route
    # every statement through the event system); a disposed engine's new pool keeps them.
    pool = entry.engine.pool
    if not callable(getattr(pool, "checkedout", None)):
        event.listen(pool, "checkout", on_checkout)
    event.listen(pool, "checkin", on_checkin)
    event.listen(pool, "detach", on_detach)


def in_use(entry: CachedEngine) -> bool:
    """Whether any connection of ``entry``'s engine is checked out now."""
    checkedout = getattr(entry.engine.pool, "checkedout", None)
    if callable(checkedout):
        try:
            return int(checkedout()) > 0
        except Exception:  # a pool that cannot say: count what the listeners saw
            return bool(entry.in_use)
    return bool(entry.in_use)


def _pool_status(entry: CachedEngine, now: float) -> PoolStatus:
    pool = entry.engine.pool

    def read(name: str) -> int | None:
        method = getattr(pool, name, None)
        try:
            return int(method()) if callable(method) else None
        except Exception:  # a pool that cannot report this number
            return None

    plan = entry.plan
    return PoolStatus(
        database_id=plan.database_id,
        catalog=plan.catalog,
        schema=plan.schema,
        user=plan.user,
        url=masked_url(entry.engine.url),
        pool_class=type(pool).__name__,
        size=read("size"),
        checked_in=read("checkedin"),
        checked_out=read("checkedout"),
        overflow=read("overflow"),
        hits=count_value(entry.hits),
        idle_seconds=round(now - entry.last_used, 3),
        max_connections=pool_max_connections(pool, plan),
    )


def pool_max_connections(pool: Any, plan: EnginePlan) -> int | None:
    """HikariCP's maximumPoolSize for this engine: pool_size + max_overflow, within the cap."""
    kinds = {k.__name__ for k in type(pool).__mro__}
    if "QueuePool" in kinds:
        overflow = int(plan.kwargs.get("max_overflow", 10))
        size = int(plan.kwargs.get("pool_size", 5))
        bound: int | None = None if overflow < 0 or size == 0 else size + overflow
    elif kinds & {"StaticPool", "AssertionPool"}:
        bound = 1
    else:  # NullPool opens one per checkout; SingletonThreadPool one per thread
        bound = None
    cap = plan.max_connections
    if cap is None:
        return bound
    return cap if bound is None else min(cap, bound)


def _drop_locals(exc: BaseException) -> None:
    """Strip from ``exc`` what would keep a plan alive: frames' locals, a suppressed context.

    A plan's URL holds the password; an error the caller keeps (or logs with
    its locals) must not hold the plan, nor the driver's exception about it.
    """
    if exc.__suppress_context__:
        exc.__context__ = None
    traceback.clear_frames(exc.__traceback__)


def _mask(exc: BaseException, plan: EnginePlan) -> str:
    text = f"{type(exc).__name__}: {exc}"
    for secret in url_secrets(plan.url):  # password, secret query values (longest first)
        text = text.replace(secret, "***")
    for secret in plan.redact:  # encrypted_extra's keys and values (longest first)
        text = text.replace(secret, "***")
    return text
