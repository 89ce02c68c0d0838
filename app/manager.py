"""The synchronous facade: ``EngineManager`` turns actor futures into plain calls.

Callers never see an actor. A hit reads the registry's published snapshot
(a dict lookup); a miss, a disposal or a stats call is one ask to an actor,
always bounded by ``ask_timeout``. A dead actor is restarted by the
supervisor and the call retried once.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pykka
from pydantic import SecretStr
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from enginehouse import credentials, forking
from enginehouse.actors import (
    ChildSpec,
    EngineRegistry,
    Janitor,
    RestartLedger,
    RestartPolicy,
    Snapshot,
    Supervisor,
    count_value,
)
from enginehouse.actors.host_keys import default_known_hosts_file
from enginehouse.actors.tunnel_directory import (
    TunnelDirectory,
    TunnelHealthRound,
    TunnelPreparer,
    await_replies,
    directory_lookup,
)
from enginehouse.budget_client import Budgets
from enginehouse.errors import (
    ActorTimeoutError,
    ActorUnavailableError,
    ConnectFailedError,
    EngineManagerError,
    InvalidSpecError,
    ManagerShutDownError,
    PoolExhaustedError,
)
from enginehouse.leaks import LeakDetector, request_source
from enginehouse.messages.janitor import Tick
from enginehouse.messages.registry import (
    BuildUncached,
    CachedEngine,
    DisposeDatabase,
    EnginePlan,
    GetEngine,
    GetStats,
    RegistryStats,
    RequestKey,
)
from enginehouse.messages.supervision import (
    GetSupervisionStats,
    StopChildren,
    SupervisionStats,
    WhereIs,
)
from enginehouse.messages.tunnel import GetTunnelStats, ReleaseForwards
from enginehouse.plan import build_plan, request_key, with_budgeted_pool
from enginehouse.safety import check_uri
from enginehouse.settings import ManagerSettings, Mode
from enginehouse.single_flight import SingleFlight
from enginehouse.specs import DatabaseSpec, SSHTunnelSpec
from enginehouse.stats import ActorStats, BudgetStats, EngineStats, LongHolderStats, ManagerStats

log = logging.getLogger("enginehouse.manager")
_monotonic = time.monotonic
_fork_state = forking.state


@dataclass
class _System:
    """One incarnation of the actor system (a new one after each fork)."""

    generation: int
    snapshot: Snapshot
    supervisor: pykka.ActorRef[Any]
    refs: dict[str, pykka.ActorRef[Any]] = field(default_factory=dict)


class EngineManager:
    """Hands out SQLAlchemy engines, cached per key (SINGLETON) or fresh (NEW).

    ``EngineManager(mode="singleton", idle_timeout=300, ...)`` takes the
    settings of :class:`~enginehouse.settings.ManagerSettings` as keywords (or one
    ``settings=`` object); unset ones come from ``ENGINEHOUSE_*`` variables.
    """

    def __init__(self, settings: ManagerSettings | None = None, **values: Any) -> None:
        if settings is not None and values:
            raise InvalidSpecError("settings", "give a settings object or keywords, not both")
        self.settings = settings if settings is not None else ManagerSettings.build(**values)
        self._new_mode = self.settings.mode is Mode.NEW
        self._mutated = self.settings.connection_mutator is not None  # user, source in keys
        self._hit_path = not self._new_mode  # SINGLETON: look up the snapshot first
        # What connect() returns: a Checkout, one that disposes its engine after (NEW),
        # or None: the engine_context generator.
        self._checkout: type[Checkout] | None = None
        if self.settings.engine_context is None:
            self._checkout = NewModeCheckout if self._new_mode else Checkout
        # The hit path's gate: the running system's snapshot while a hit may be served
        # (SINGLETON, not shut down, not a forked child that has not restarted yet).
        self._hot: Snapshot | None = None
        self._hits = itertools.count()
        self._closed = False
        self._starts: SingleFlight[_System] = SingleFlight()
        # The facade supervises the Supervisor: same intensity, no backoff (a rare bug path).
        self._supervisor_ledger = RestartLedger(_policy(self.settings))
        self._budgets = Budgets(self.settings, self._live)
        threshold = self.settings.leak_detection_threshold
        self._leaks = LeakDetector(threshold) if threshold is not None else None
        # Whether a checkout must publish its request's source (request_source): for the
        # leak detector, and once any engine has a pool with connection_shares.
        self._sourced = self._leaks is not None
        self._system = self._start()
        forking.track(self)
        _live_managers.add(self)

    # -- public API ------------------------------------------------------------

    def get(
        self,
        database: DatabaseSpec,
        *,
        catalog: str | None = None,
        schema: str | None = None,
        source: str | None = None,
        user: str | None = None,
        access_token: str | SecretStr | None = None,
    ) -> Engine:
        """The engine for ``database`` at ``catalog``/``schema`` as ``user``.

        ``access_token`` is ``user``'s OAuth2 token (a secret): the adapter
        places it in each new connection; a refreshed token updates that
        user's engine rather than building another.
        """
        return self._engine(database, catalog, schema, source, user, access_token)

    def get_planned(self, plan: EnginePlan) -> Engine:
        """The engine for a plan an integration built itself, its URL and arguments final.

        For hosts that apply their own engine rules before ``create_engine``
        (Superset's engine specs, see enginehouse.integrations.superset): no
        adapter, mutator or URI check runs here. SINGLETON: one cached engine
        per ``plan.engine_key``; NEW: a new engine each call. Caps
        (``plan.max_connections``) and ``plan.tunnel`` apply as for :meth:`get`.
        """
        system = self._live()
        if plan.tunnel is not None:
            self._tunnels.warm(plan)
        if self._new_mode:
            built = with_budgeted_pool(plan, self.settings)
            engine: Engine = self._ask(system, "registry", BuildUncached(built))
            return engine
        key = RequestKey(
            plan.database_id, plan.engine_key, plan.catalog, plan.schema, plan.user, None
        )
        entry = system.snapshot.entries.get(key)
        if entry is None:  # a miss: the capped pool class is chosen only here
            planned = with_budgeted_pool(plan, self.settings)
            entry = self._ask(system, "registry", GetEngine(key, planned))
        else:
            next(self._hits)
            next(entry.hits)
            entry.last_used = _monotonic()
        return entry.engine

    def open_forward(self, tunnel: SSHTunnelSpec, host: str, port: int, *, owner: int | str) -> int:
        """A port on 127.0.0.1 reaching ``host:port`` through ``tunnel``'s shared SSH session.

        For hosts whose own code points engines at a local forward (Superset's
        SSH manager). The forward is ``owner``'s until :meth:`dispose` of it.
        """
        self._live()
        return self._tunnels.forward(tunnel, host, port, owner)

    def connect(
        self,
        database: DatabaseSpec,
        *,
        catalog: str | None = None,
        schema: str | None = None,
        source: str | None = None,
        user: str | None = None,
        access_token: str | SecretStr | None = None,
    ) -> AbstractContextManager[Connection]:
        """A connection from :meth:`get`'s engine; in NEW mode the engine is disposed after.

        The ``engine_context`` setting's context manager, if any, is entered
        around all of it (engine lookup included); what it raises reaches the
        caller unchanged. Nothing runs before the ``with`` block is entered.
        """
        checkout = self._checkout
        if checkout is not None:
            if source is None and user is None and access_token is None:
                return checkout((self, database, catalog, schema, None))
            return checkout((self, database, catalog, schema, (source, user, access_token)))
        request: dict[str, Any] = {
            "catalog": catalog,
            "schema": schema,
            "source": source,
            "user": user,
            "access_token": access_token,
        }
        return self._connect_in_context(database, request)

    @contextmanager
    def _connect_in_context(
        self, database: DatabaseSpec, request: dict[str, Any]
    ) -> Iterator[Connection]:
        context = self.settings.engine_context
        assert context is not None
        scope: AbstractContextManager[Any] = context(
            database,
            catalog=request["catalog"],
            schema=request["schema"],
            user=request["user"],
            source=request["source"],
        )
        with scope:
            engine = self.get(database, **request)
            token = request_source.set(request["source"])  # for leak detection and shares
            try:
                try:
                    checkout = engine.connect()
                except Exception as exc:
                    ours = _checkout_error(database, exc)
                    if ours is None:
                        raise
                    raise ours from None
                finally:
                    request_source.reset(token)
                with checkout as connection:
                    yield connection
            finally:
                if self._new_mode:
                    engine.dispose()

    def dispose(self, database_id: int | str) -> int:
        """Dispose every engine of one database (all catalogs, schemas, users)."""
        system = self._live()
        disposed: int = self._ask(system, "registry", DisposeDatabase(database_id))
        # The last owner of a forward closes it (and the last forward, its SSH session).
        releases = self._ask(system, "tunnels", ReleaseForwards(database_id))
        await_replies(releases, self.settings.ask_timeout)  # here, never in an actor
        return disposed

    def sweep(self) -> None:
        """Run one Janitor round now (evict idle engines, enforce ``max_engines``)."""
        system = self._live()
        for _attempt in range(2):
            try:
                self._where_is(system, "janitor").tell(Tick(scheduled=False))
                return
            except pykka.ActorDeadError:
                continue  # it died after WhereIs answered: the next WhereIs restarts it
        raise ActorUnavailableError("janitor died twice while handling Tick")

    def stats(self) -> ManagerStats:
        """Counters, pools and actor health."""
        system = self._live()
        registry: RegistryStats = self._ask(system, "registry", GetStats())
        supervision: SupervisionStats = self._ask_supervisor(system, GetSupervisionStats())
        return ManagerStats(
            mode=self.settings.mode,
            engine_count=len(registry.engines),
            hits=count_value(self._hits),
            misses=registry.misses,
            evictions=registry.evictions,
            disposals=registry.disposals,
            created=registry.created,
            uncached_created=registry.uncached_created,
            restarts=supervision.restarts + self._supervisor_ledger.restarts,
            engines=[
                EngineStats(schema_name=pool.schema, **_without(vars(pool), "schema"))
                for pool in registry.engines
            ],
            actors=[ActorStats(**vars(child)) for child in supervision.children],
            tunnels=list(self._ask(system, "tunnels", GetTunnelStats())),
            budgets=[BudgetStats(**vars(status)) for status in self._budgets.stats()],
            **self._leak_stats(),
        )

    def _leak_stats(self) -> dict[str, Any]:
        if self._leaks is None:
            return {}
        return {
            "leaks": {str(db): n for db, n in self._leaks.reported().items()},
            "long_holders": [LongHolderStats(**vars(h)) for h in self._leaks.long_holders()],
        }

    def shutdown(self) -> None:
        """Stop every actor and dispose every engine. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._hot = None
        forking.untrack(self)
        _live_managers.discard(self)
        system = self._system
        if system.generation != forking.state.generation:
            return  # a forked child never started this incarnation's actors
        timeout = self.settings.ask_timeout
        try:
            system.supervisor.ask(StopChildren(timeout), timeout=timeout * 3)
        except (pykka.ActorDeadError, pykka.Timeout) as exc:
            log.warning("shutdown incomplete: %s", exc)
        with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
            # It stops itself after StopChildren; this covers an ask that timed out.
            system.supervisor.stop(block=True, timeout=timeout)
        log.info("manager shut down")

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> EngineManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running"
        return f"<EngineManager mode={self.settings.mode.value} {state}>"

    # -- fork safety -----------------------------------------------------------

    def after_fork_in_child(self) -> None:
        """Drop inherited pools without closing the parent's sockets."""
        self._hot = None  # no hit before this process has its own actor system
        for entry in self._system.snapshot.entries.values():
            entry.engine.dispose(close=False)

    # -- internals -------------------------------------------------------------

    def _start(self) -> _System:
        settings = self.settings
        snapshot = Snapshot()
        policy = _policy(settings)
        # SSH tunnels start first so they stop last, after the engines that use them.
        capped = settings.max_tunnels_per_bastion is not None  # uncapped: no permit calls at all
        # Opens forwards in callers' threads; the registry's prepare only reads what it opened.
        preparer = TunnelPreparer(None, settings.ask_timeout)
        tunnels = ChildSpec(
            "tunnels",
            lambda sup: TunnelDirectory.start(
                policy=policy,
                connect_timeout=min(settings.tunnel_connect_timeout, settings.ask_timeout * 0.3),
                ask_timeout=settings.ask_timeout,
                idle_timeout=settings.tunnel_idle_timeout,
                supervisor=sup,
                hold_session=self._budgets.hold_tunnel if capped else None,
                release_session=self._budgets.release if capped else None,
                keepalive_interval=settings.tunnel_keepalive_interval,
                keepalive_timeout=settings.tunnel_keepalive_timeout,
                known_hosts=settings.ssh_known_hosts_file or default_known_hosts_file(),
                transport=settings.ssh_transport,
            ),
            policy,
        )
        children = [
            tunnels,
            ChildSpec("budget", self._budgets.start_keeper, policy),
            # Started after the keeper, so it stops before it: releases still queued
            # when the engines are disposed reach a live keeper.
            ChildSpec("closer", self._budgets.start_closer, policy),
            ChildSpec(
                "registry",
                lambda sup: EngineRegistry.start(
                    snapshot,
                    max_engines=settings.max_engines,
                    supervisor=sup,
                    prepare=preparer,
                    on_engine_created=self._on_engine_created,
                ),
                policy,
            ),
            ChildSpec(
                "janitor",
                lambda sup: Janitor.start(
                    sup,
                    interval=self._janitor_interval(),
                    idle_timeout=settings.idle_timeout,
                    max_engines=settings.max_engines,
                    ask_timeout=settings.ask_timeout,
                    rounds=[
                        TunnelHealthRound(
                            sup,
                            None if settings.mode is Mode.NEW else snapshot,
                        ),
                        self._budgets.janitor_round,
                        *([self._leaks.janitor_round] if self._leaks is not None else []),
                    ],
                ),
                policy,
            ),
        ]
        supervisor = Supervisor.start(children)
        # Opens SSH sessions in the caller's thread, so a slow bastion never holds the registry.
        preparer.lookup = directory_lookup(supervisor, settings.ask_timeout)
        self._tunnels = preparer
        self._hot = snapshot if self._hit_path and not self._closed else None
        return _System(forking.state.generation, snapshot, supervisor)

    def _on_engine_created(self, engine: Engine, plan: EnginePlan) -> None:
        """The registry's hook for each new engine: its budget, then leak detection."""
        if getattr(engine.pool, "connection_shares", None) is not None:
            self._sourced = True  # before the engine is published, so before any hit on it
        self._budgets.on_engine_created(engine, plan)
        if self._leaks is not None:
            self._leaks.on_engine_created(engine, plan)

    def _janitor_interval(self) -> float:
        """The Janitor's period: ``cleanup_interval``, shorter when leaks must be seen in time."""
        interval = self.settings.cleanup_interval
        threshold = self.settings.leak_detection_threshold
        return interval if threshold is None else min(interval, max(threshold / 2, 0.05))

    def _live(self) -> _System:
        system = self._system
        if self._closed:
            raise ManagerShutDownError("this EngineManager was shut down")
        if system.generation != forking.state.generation:
            system = self._starts.run(
                forking.state.generation, self._restart_after_fork, self.settings.ask_timeout
            )
        return system

    def _restart_after_fork(self) -> _System:
        log.info("fork detected: starting a fresh actor system in this process")
        self._hits = itertools.count()
        self._system = self._start()
        return self._system

    def _miss(
        self,
        system: _System,
        database: DatabaseSpec,
        key: RequestKey,
        access_token: str | SecretStr | None = None,
    ) -> CachedEngine:
        plan = self._plan(database, key, access_token)
        entry: CachedEngine = self._ask(system, "registry", GetEngine(key, plan))
        return entry

    def _engine(
        self,
        database: DatabaseSpec,
        catalog: str | None,
        schema: str | None,
        source: str | None,
        user: str | None,
        access_token: str | SecretStr | None,
    ) -> Engine:
        """:meth:`get` with positional arguments (``connect()`` calls it once per query)."""
        hot = self._hot
        if hot is not None and user is None and source is None and access_token is None:
            # The common hit: request_key's tuple for no user, source or token (a
            # NamedTuple key equals and hashes as its tuple), looked up directly; the
            # spec's fields (and fingerprint, once computed) read from its __dict__.
            try:
                fields = database.__dict__
                common = (fields["id"], fields["fingerprint"], catalog, schema, None, None)
                cached = hot.entries[common]  # type: ignore[index]
            except (KeyError, AttributeError, TypeError):  # a miss, or not a spec: see below
                pass
            else:
                next(self._hits)
                next(cached.hits)
                cached.last_used = _monotonic()
                return cached.engine
        system = self._system
        if self._closed or system.generation != _fork_state.generation:
            system = self._live()
        if not isinstance(database, DatabaseSpec):
            raise InvalidSpecError("database", "must be a DatabaseSpec")
        if access_token is None and self._hit_path and not database.impersonate_user:
            # The hit path: request_key's rule for this case, as a plain tuple (a
            # NamedTuple equals and hashes as its tuple); no call, no keywords.
            mutated = self._mutated
            hit = (
                database.id,
                database.fingerprint,
                catalog,
                schema,
                user if mutated else None,
                source if mutated else None,
            )
            entry = system.snapshot.entries.get(hit)  # type: ignore[call-overload]
            if entry is not None:
                next(self._hits)
                next(entry.hits)
                entry.last_used = _monotonic()
                return entry.engine
        key = request_key(
            database,
            self.settings,
            catalog=catalog,
            schema=schema,
            user=user,
            source=source,
            access_token=access_token,
        )
        if self._new_mode:
            plan = self._plan(database, key, access_token)
            engine: Engine = self._ask(system, "registry", BuildUncached(plan))
            return engine
        entry = system.snapshot.entries.get(key)
        if entry is None:
            entry = self._miss(system, database, key, access_token)
        else:
            next(self._hits)
            next(entry.hits)
            entry.last_used = _monotonic()
        if access_token is not None:
            _refresh_token(entry, access_token)
        return entry.engine

    def _plan(
        self, database: DatabaseSpec, key: RequestKey, access_token: str | SecretStr | None
    ) -> EnginePlan:
        """Build and validate a plan in the caller's thread (hooks never run in an actor)."""
        plan = build_plan(database, key, self.settings, access_token=access_token)
        check_uri(plan.url, database, self.settings)
        if plan.tunnel is not None:
            self._tunnels.warm(plan)
        return plan

    def _ask(self, system: _System, name: str, message: object) -> Any:
        timeout = self.settings.ask_timeout
        for _attempt in range(2):
            ref = system.refs.get(name) or self._where_is(system, name)
            try:
                return ref.ask(message, timeout=timeout)
            except pykka.ActorDeadError:
                system.refs.pop(name, None)  # crashed: the supervisor restarts it
            except pykka.Timeout:
                raise ActorTimeoutError(
                    f"{name} did not answer {type(message).__name__} within {timeout:g}s"
                ) from None
        raise ActorUnavailableError(f"{name} died twice while handling {type(message).__name__}")

    def _where_is(self, system: _System, name: str) -> pykka.ActorRef[Any]:
        ref: pykka.ActorRef[Any] = self._ask_supervisor(system, WhereIs(name))
        system.refs[name] = ref
        return ref

    def _ask_supervisor(self, system: _System, message: object) -> Any:
        timeout = self.settings.ask_timeout
        for _attempt in range(2):
            try:
                return system.supervisor.ask(message, timeout=timeout)
            except pykka.ActorDeadError:
                system = self._revive(system)
            except pykka.Timeout:
                raise ActorTimeoutError(
                    f"supervisor did not answer {type(message).__name__} within {timeout:g}s"
                ) from None
        raise ActorUnavailableError(f"the supervisor died twice handling {type(message).__name__}")

    def _revive(self, dead: _System) -> _System:
        """A new actor system once the supervisor crashed (its children stopped with it)."""
        key = ("revive", dead.supervisor.actor_urn)
        restart = partial(self._restart_after_crash, dead)
        return self._starts.run(key, restart, self.settings.ask_timeout)

    def _restart_after_crash(self, dead: _System) -> _System:
        if self._closed:
            raise ManagerShutDownError("this EngineManager was shut down")
        if self._system is not dead:
            return self._system  # a fork or an earlier revival replaced it already
        if self._supervisor_ledger.next_delay() is None:
            policy = self._supervisor_ledger.policy
            raise ActorUnavailableError(
                f"the supervisor crashed more than {policy.max_restarts} times "
                f"within {policy.period:g}s"
            )
        log.warning("the supervisor crashed: starting a fresh actor system")
        self._system = self._start()
        return self._system


def _refresh_token(entry: CachedEngine, token: str | SecretStr) -> None:
    # The engine's holder, not the request's: concurrent misses share the first plan's.
    holder = credentials.holder_of(entry.plan.kwargs)
    if holder is not None:
        holder.set(token)


def _policy(settings: ManagerSettings) -> RestartPolicy:
    return RestartPolicy(
        max_restarts=settings.restart_max,
        period=settings.restart_period,
        backoff=settings.restart_backoff,
        backoff_max=settings.restart_backoff_max,
    )


class Checkout(list[Any]):
    """What :meth:`EngineManager.connect` returns when no ``engine_context`` is set.

    The same steps as the generator of ``_connect_in_context`` without a
    scope, written out as a class: ``connect()`` runs once per query, and on
    Python 3.10 each Python call and attribute lookup on this path was a
    visible share of a pooled SELECT 1 (docs/benchmarks.md, Core). Hence:

    - it is the list ``[manager, database, catalog, schema, request]``, built
      by list's own C initialiser (a Python ``__init__`` cost ~1,800 CPU
      instructions per query); ``request`` is ``(source, user, access_token)``,
      or None when all three are None;
    - that common request looks its hit up here, inline (the rule of
      ``EngineManager._engine``); any other goes through ``_engine``;
    - a hit is not stamped ``last_used``: the connection's checkin stamps it,
      and an engine with a connection out is never evicted as idle;
    - whether to publish the request's source is one flag of the manager's.
    """

    __slots__ = ("_connection", "_engine")

    def __enter__(self) -> Connection:
        manager, database, catalog, schema, request = self
        hot = manager._hot
        entry = None
        if hot is not None and request is None:
            try:  # pydantic keeps a spec's fields, and its fingerprint once computed, here
                fields = database.__dict__
                hit = (fields["id"], fields["fingerprint"], catalog, schema, None, None)
                entry = hot.entries[hit]
            except (KeyError, AttributeError, TypeError):  # a miss, or not a spec: _engine says
                pass
        if entry is not None:
            next(manager._hits)
            next(entry.hits)
            engine = entry.engine
            plain = not manager._sourced
        else:
            source, user, token = request or (None, None, None)
            self._engine = engine = manager._engine(database, catalog, schema, source, user, token)
            plain = not manager._sourced and "connection_shares" not in database.extra
        try:
            if plain:
                connection = engine.connect()
            else:  # the leak detector and the pool's shares by source read the request's source
                context = request_source.set(request[0] if request is not None else None)
                try:
                    connection = engine.connect()
                finally:
                    request_source.reset(context)
        except BaseException as exc:
            if manager._new_mode:
                engine.dispose()
            ours = _checkout_error(database, exc)
            if ours is not None:
                raise ours from None
            raise
        self._connection = connection
        return connection  # Connection.__enter__ returns the connection itself

    def __exit__(self, *exc_info: Any) -> None:
        self._connection.close()  # what Connection.__exit__ does


class NewModeCheckout(Checkout):
    """A :class:`Checkout` in NEW mode: its engine (never a hit) is disposed after the block."""

    __slots__ = ()

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self._connection.close()
        finally:
            self._engine.dispose()


def _checkout_error(database: DatabaseSpec, exc: BaseException) -> EngineManagerError | None:
    """A failed checkout as ours (None: already ours, or not a checkout failure).

    SQLAlchemy's pool timeout becomes :class:`PoolExhaustedError`; the driver's
    refusal (``DBAPIError``, or a bare ``OSError`` such as EMFILE that a driver
    lets through) :class:`ConnectFailedError`, in the driver's words with the
    spec's password and secret query parameters masked.
    """
    if isinstance(exc, EngineManagerError) or not isinstance(
        exc, (sa_exc.TimeoutError, sa_exc.DBAPIError, OSError)
    ):
        return None
    detail = _masked(database, str(exc).split("\n(Background on this error", 1)[0])
    detail = detail.split(" (Background on this error", 1)[0].strip()
    if isinstance(exc, sa_exc.TimeoutError):
        return PoolExhaustedError(f"database {database.id}: {detail}")
    driver = type(getattr(exc, "orig", None) or exc).__name__
    return ConnectFailedError(
        f"database {database.id}: connect failed ({driver}): {detail}", driver_error=driver
    )


def _masked(database: DatabaseSpec, text: str) -> str:
    secrets = [database.password.get_secret_value()] if database.password is not None else []
    if database.query_secrets is not None:
        values = json.loads(database.query_secrets.get_secret_value()).values()
        secrets += [str(v) for v in values]
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _without(values: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in names}


_live_managers: weakref.WeakSet[EngineManager] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    """Stop managers nobody shut down, so the interpreter exits cleanly."""
    for manager in list(_live_managers):
        manager.shutdown()
