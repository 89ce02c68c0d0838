"""Connection and tunnel budgets, caller side: the permit source and the waiting loop.

:meth:`Budgets.on_engine_created` is the registry's hook. A capped engine's
pool is a :class:`~enginehouse.budgeted_pool.BudgetedQueuePool` (the plan
chose it); the hook attaches it to its budget, and from then on the pool takes
a permit from the BudgetKeeper actor (one ask) before each *physical* connect
and gives it back (one tell) when the connection is closed. A query on an
already pooled connection sends nothing; check-in costs one dict lookup (the
keeper's shed tokens). Other pool classes (NullPool in NEW mode,
SingletonThreadPool...) keep a creator-level cap: their creator is wrapped and
their ``close`` events free the permits.

The SSH tunnel code uses the same permits per bastion: :meth:`Budgets.hold_tunnel`
before opening a session, :meth:`Budgets.release` after closing it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pykka
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

from enginehouse import compat, fleet, forking
from enginehouse.actors.budget_keeper import BudgetKeeper
from enginehouse.actors.disconnect_watcher import (
    SERVER_GONE_WAIT,
    DisconnectWatcher,
    close_watching,
    wait_until_gone,
)
from enginehouse.actors.pools import ShareBoard
from enginehouse.budgeted_pool import BudgetedQueuePool
from enginehouse.errors import (
    ActorTimeoutError,
    ActorUnavailableError,
    ConfigurationError,
    PoolExhaustedError,
)
from enginehouse.ledger import Holdings
from enginehouse.messages.budget import (
    Acquire,
    Attach,
    BudgetStatus,
    Cancel,
    Claim,
    GetBudgetStats,
    Lease,
    Renew,
    WatchClose,
)
from enginehouse.messages.budget import Release as ReleaseMessage
from enginehouse.messages.registry import EnginePlan
from enginehouse.messages.supervision import WhereIs
from enginehouse.settings import ManagerSettings

log = logging.getLogger("enginehouse.budget")

DEFAULT_POOL_TIMEOUT = 30.0
"""SQLAlchemy's own default ``pool_timeout``: how long a waiter waits for a permit."""


class Budgets:
    """One manager's budgets (it survives forks; the keeper is started again per process)."""

    def __init__(self, settings: ManagerSettings, live: Callable[[], object]) -> None:
        self._settings = settings
        self._live = live  # the manager's _live(): restarts the actors after a fork
        self._url = settings.fleet_url.get_secret_value() if settings.fleet_url else None
        self._board = ShareBoard()
        self._ref: pykka.ActorRef[Any] | None = None
        self._generation = -1
        self._tickets = itertools.count(1)
        self._by_connection: dict[int, Lease] = {}
        self._closer: pykka.ActorRef[Any] | None = None
        self._holdings: Holdings | None = None  # permits in use, per process: survives the keeper
        self._closer_generation = -1
        if self._url is not None:
            self._check_fleet(self._url)

    # -- supervision -----------------------------------------------------------

    def start_keeper(self, supervisor: pykka.ActorRef[Any]) -> pykka.ActorRef[Any]:
        """The supervisor's factory for the ``budget`` child (also after a restart)."""
        settings = self._settings
        if self._holdings is None or self._generation != forking.state.generation:
            self._holdings = Holdings(fleet.process_id())  # a forked child holds nothing yet
        ref = BudgetKeeper.start(
            self._board,
            generation=forking.state.generation,
            holdings=self._holdings,
            fleet_url=self._url,
            fleet_fallback=settings.fleet_fallback,
            lease_ttl=settings.fleet_lease_ttl,
            prefix=settings.fleet_prefix,
            redis_timeout=min(1.0, settings.ask_timeout / 4),
            supervisor=supervisor,
        )
        self._ref, self._generation = ref, forking.state.generation
        return ref

    def start_closer(self, supervisor: pykka.ActorRef[Any]) -> pykka.ActorRef[Any]:
        """The supervisor's factory for the ``closer`` child (also after a restart)."""
        ref = DisconnectWatcher.start(self.release, supervisor=supervisor)
        self._closer, self._closer_generation = ref, forking.state.generation
        return ref

    def janitor_round(self) -> None:
        """The Janitor's extra round: renew leases, rebalance (a tell; never raises)."""
        ref = self._ref
        if ref is not None and self._generation == forking.state.generation:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(Renew())

    # -- the registry's hook ---------------------------------------------------

    def on_engine_created(self, engine: Engine, plan: EnginePlan) -> None:
        """Put ``engine`` under its database's budget (no-op when no cap applies)."""
        cap = plan.max_connections or self._settings.default_max_connections
        if cap is None:
            return
        key = f"db:{plan.database_id}"
        pool = engine.pool
        if isinstance(pool, BudgetedQueuePool):
            limit = pool.attach(self, key, cap)
        else:  # a pool the keeper cannot resize (0 says so): cap its connects
            limit = 0
            timeout = float(plan.kwargs.get("pool_timeout", DEFAULT_POOL_TIMEOUT))
            self._cap_connects(pool, key, cap, timeout)
        self._tell(Attach(key, cap, weakref.ref(engine), limit))

    @property
    def board(self) -> ShareBoard:
        """Where the keeper publishes shed tokens (budgeted pools read it on check-in)."""
        return self._board

    # -- permits ---------------------------------------------------------------

    def acquire(self, key: str, cap: int, timeout: float) -> Lease:
        """Wait (first come, first served) up to ``timeout`` s for a permit of ``key``.

        The keeper grants only before our deadline and only after taking the
        claim; leaving, we take the claim first. So a permit reaches us, or
        nobody: none is granted to a caller who left, whatever the keeper's pace.
        """
        ref = self._keeper()
        ticket = next(self._tickets)
        reply: pykka.ThreadingFuture[Lease] = pykka.ThreadingFuture()
        claim = Claim()
        deadline = time.monotonic() + timeout
        try:
            ref.tell(Acquire(key, cap, ticket, deadline, reply, claim))
        except pykka.ActorDeadError:
            raise ActorUnavailableError("the budget keeper is down") from None
        try:
            return reply.get(timeout=max(0.0, deadline - time.monotonic()))
        except pykka.Timeout:
            pass
        if not claim.take():  # the keeper took it: the permit (or its error) is on its way
            ask_timeout = self._settings.ask_timeout
            try:
                return reply.get(timeout=ask_timeout)
            except pykka.Timeout:
                raise ActorTimeoutError(
                    f"budget keeper granted a permit of {key} but it did not arrive "
                    f"within {ask_timeout:g}s"
                ) from None
        with contextlib.suppress(pykka.ActorDeadError):
            ref.tell(Cancel(key, ticket))  # drop our place in its queue now
        where = "across the fleet" if self._url is not None else "in this process"
        raise PoolExhaustedError(
            f"budget {key}: no connection within pool_timeout={timeout:g}s "
            f"(max_connections={cap} {where})"
        )

    def release(self, lease: Lease) -> None:
        """Give a permit back (idempotent per connection; ignores leases of a parent process)."""
        ref = self._ref
        if ref is None or lease.generation != forking.state.generation:
            return
        ref = self._board.keeper or ref  # a restarted keeper, before start() returned it
        if self._holdings is not None:
            self._holdings.drop(lease.lease_id)  # first: a restarted keeper must not adopt it
        with contextlib.suppress(pykka.ActorDeadError):
            ref.tell(ReleaseMessage(lease.key, lease.lease_id))

    @contextmanager
    def hold(self, key: str, cap: int, timeout: float) -> Iterator[Lease]:
        """``with budgets.hold(key, cap, timeout):`` a permit for the block."""
        lease = self.acquire(key, cap, timeout)
        try:
            yield lease
        finally:
            self.release(lease)

    def hold_tunnel(self, bastion: str, timeout: float) -> Lease | None:
        """A permit for one SSH session to ``bastion`` (None when uncapped).

        Integration point for the tunnel code: call it before opening a
        session and :meth:`release` the lease after closing it.
        """
        cap = self._settings.max_tunnels_per_bastion
        if cap is None:
            return None
        return self.acquire(f"ssh:{bastion}", cap, timeout)

    def stats(self) -> tuple[BudgetStatus, ...]:
        ref = self._keeper()
        try:
            status: tuple[BudgetStatus, ...] = ref.ask(  # type: ignore[assignment]
                GetBudgetStats(), timeout=self._settings.ask_timeout
            )
        except (pykka.ActorDeadError, pykka.Timeout):
            return ()
        return status

    # -- internals -------------------------------------------------------------

    def _keeper(self) -> pykka.ActorRef[Any]:
        if self._generation != forking.state.generation:
            self._live()  # a forked child: start this process's actors first
        ref = self._ref
        if ref is None or not ref.is_alive():  # starting, or crashed: the supervisor knows
            supervisor = getattr(self._live(), "supervisor", None)
            try:
                found = supervisor.ask(WhereIs("budget"), timeout=self._settings.ask_timeout)  # type: ignore[union-attr]
            except (AttributeError, pykka.ActorDeadError, pykka.Timeout):
                found = None
            ref = found if isinstance(found, pykka.ActorRef) else self._ref
        if ref is None:
            raise ActorUnavailableError("the budget keeper is not running")
        return ref

    def _tell(self, message: object) -> None:
        with contextlib.suppress(pykka.ActorDeadError):
            self._keeper().tell(message)

    def _cap_connects(self, pool: Pool, key: str, cap: int, timeout: float) -> None:
        """The creator-level cap of a pool class we do not subclass: a permit per connect."""
        budgets = self

        def with_permits(connect: compat.Creator) -> compat.Creator:
            def connect_with_permit(connection_record: Any = None) -> Any:
                lease = budgets.acquire(key, cap, timeout)
                try:
                    connection = connect(connection_record)
                except BaseException:
                    budgets.release(lease)
                    raise
                budgets._track(connection, lease)
                return connection

            return connect_with_permit

        compat.wrap_creator(pool, with_permits)  # recreate() (dispose) passes it on
        # Pool events (not engine events): the statement path stays event-free, and
        # dispose()'s recreated pool inherits them with its dispatch.
        event.listen(pool, "close", self._closed)
        event.listen(pool, "close_detached", self._closed_detached)
        event.listen(pool, "checkin", self._checkin_listener(key))

    def _track(self, connection: Any, lease: Lease) -> None:
        self._by_connection[id(connection)] = lease
        # Safety net: a connection dropped without a close event still frees its permit
        # (a driver whose connections take no weak references relies on the events only).
        with contextlib.suppress(TypeError):
            weakref.finalize(connection, self._forget, id(connection)).atexit = False

    def _forget(self, connection_id: int) -> None:
        lease = self._by_connection.pop(connection_id, None)
        if lease is not None:
            self.release(lease)

    def _closed(self, dbapi_connection: Any, record: Any) -> None:
        self._closed_detached(dbapi_connection)

    def _closed_detached(self, dbapi_connection: Any) -> None:
        lease = self._by_connection.pop(id(dbapi_connection), None)
        if lease is not None:
            self.closing(dbapi_connection, lease)

    def closing(self, dbapi_connection: Any, lease: Lease) -> None:
        """A pool is about to close ``dbapi_connection``: free its permit once it is gone.

        Closes it here first (closing twice is harmless) and frees the permit only
        once the server has dropped it; the DisconnectWatcher waits for that, not
        this thread.
        """
        watch = close_watching(dbapi_connection)
        if watch is None:
            self.release(lease)
            return
        closed_at = time.monotonic()
        closer = self._closer if self._closer_generation == forking.state.generation else None
        if closer is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                closer.tell(WatchClose(watch, lease, closed_at))
                return
        wait_until_gone(watch, deadline=closed_at + SERVER_GONE_WAIT)
        self.release(lease)

    def _checkin_listener(self, key: str) -> Callable[[Any, Any], None]:
        shed = self._board.shed

        def on_checkin(dbapi_connection: Any, record: Any) -> None:
            tokens = shed.get(key)
            if tokens is None or dbapi_connection is None:
                return
            if next(tokens, None) is not None:
                record.invalidate()  # closes it: the close event frees the permit

        return on_checkin

    def _check_fleet(self, url: str) -> None:
        settings = self._settings
        try:
            fleet.check_reachable(url, settings.fleet_prefix, min(1.0, settings.ask_timeout / 4))
        except ConfigurationError as exc:
            if settings.fleet_fallback != "local":
                raise
            log.warning("%s; starting under local shares (fleet_fallback='local')", exc)


def close_and_wait(dbapi_connection: Any) -> None:
    """Close a DBAPI connection and wait (at most 1 s) until the server has dropped it.

    What the DisconnectWatcher actor does off the closing thread; used inline when no
    DisconnectWatcher runs (and by the budget benchmark, to price the wait on its own).
    """
    watch = close_watching(dbapi_connection)
    if watch is not None:
        wait_until_gone(watch, deadline=time.monotonic() + SERVER_GONE_WAIT)

