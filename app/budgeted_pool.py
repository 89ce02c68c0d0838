"""A QueuePool that draws on a connection budget: one permit per physical connection.

The plan selects :class:`BudgetedQueuePool` for a database with a connection
cap (``extra.max_connections`` or ``default_max_connections``) whose pool would
otherwise be a QueuePool. The budget's whole hold on connections lives here:

* each physical connect first takes a permit from the pool's permit source
  (the manager's :class:`~enginehouse.budget_client.Budgets`), and each close
  gives it back, whatever closed it (check-in, invalidation, recycling,
  ``dispose()``, a detached or garbage-collected connection);
* the BudgetKeeper resizes the pool at run time (:meth:`~BudgetedQueuePool.resize`:
  a process's fair share changes as processes come and go) and asks it to shed
  idle connections (:meth:`~BudgetedQueuePool.shed_idle`) or, through shed
  tokens on its board, the next ones checked in;
* a checkout that waits ``pool_timeout`` gets PoolExhaustedError naming the budget.

The pool receives its permit source after creation (:meth:`~BudgetedQueuePool.attach`;
``create_engine()`` passes only pool arguments) and hands it on in ``recreate()``,
so the pool that replaces a disposed one keeps the budget. QueuePool's own
counters do the counting (through :mod:`enginehouse.compat`); our code takes no lock.

Checkouts that find the pool at its bound wait in a
:class:`~enginehouse.shares.FairQueue`, never in QueuePool's queue: a
connection that comes back goes to the longest waiter (QueuePool lets
whoever asks next take it, so the thread that just returned one takes it
right back). With a ``connection_shares`` argument (the plan passes a
database's ``extra.connection_shares``) the queue is one FIFO per request
source, served by weighted share.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any, Protocol

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import QueuePool

from enginehouse import compat
from enginehouse.errors import PoolExhaustedError
from enginehouse.shares import FairQueue, request_source


class ShedBoard(Protocol):
    """Where the keeper publishes shed tokens: ``shed[key]`` yields one per connection to close."""

    shed: dict[str, Iterator[int]]


class PermitSource(Protocol):
    """What a budgeted pool draws on (the manager's Budgets)."""

    @property
    def board(self) -> ShedBoard:
        """Where the keeper publishes shed tokens."""

    def acquire(self, key: str, cap: int, timeout: float) -> Any:
        """Wait up to ``timeout`` s for a permit of budget ``key``; a lease."""

    def release(self, lease: Any) -> None:
        """Give a lease's permit back (idempotent)."""

    def closing(self, dbapi_connection: Any, lease: Any) -> None:
        """``dbapi_connection`` is being closed: close it, free the permit once it is gone."""


class BudgetedQueuePool(QueuePool):
    """QueuePool whose connections each hold a permit of one budget, resized at run time.

    ``pool_size + max_overflow`` (unbounded if ``pool_size`` is 0 or
    ``max_overflow`` -1) is the pool's own bound; attached to a budget, the
    pool holds at most ``min(own bound, cap)`` connections, or less while the
    keeper says its share is smaller. Until attached it is a QueuePool with
    one bound (``pool_size + max_overflow``) and takes no permit.
    """

    def __init__(
        self,
        creator: Any,
        pool_size: int = 5,
        max_overflow: int = 10,
        connection_shares: dict[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(creator, pool_size=pool_size, max_overflow=max_overflow, **kw)
        self.connection_shares = connection_shares
        """The database's shares by source (:func:`enginehouse.shares.pool_argument`), or None."""
        self.fair = FairQueue(connection_shares)
        """The wait queue: FIFO, or by source and weighted share when shares are set."""
        unbounded = pool_size == 0 or max_overflow == compat.UNBOUNDED
        self.own_limit = compat.UNBOUNDED if unbounded else pool_size + max_overflow
        """The bound the engine's own pool arguments give (UNBOUNDED: none)."""
        self.budget_key: str | None = None
        self.cap = 0
        self._permits: PermitSource | None = None
        self._shed: dict[str, Iterator[int]] = {}  # the keeper's shed tokens, by budget
        self._leases: dict[int, Any] = {}  # id(DBAPI connection) -> its lease
        compat.count_connections(self, self.own_limit)
        compat.wrap_connect(self, self._connect_with_permit)

    # -- the budget --------------------------------------------------------------

    def attach(self, permits: PermitSource, key: str, cap: int, limit: int | None = None) -> int:
        """Draw on budget ``key`` (at most ``cap`` connections) of ``permits``; the pool's bound.

        ``limit``: start below that bound (a recreated pool keeps its predecessor's share).
        """
        self._permits, self.budget_key, self.cap = permits, key, cap
        self._shed = permits.board.shed
        bound = cap if self.own_limit == compat.UNBOUNDED else min(cap, self.own_limit)
        compat.set_connection_limit(self, bound if limit is None else min(bound, limit))
        return bound

    @property
    def limit(self) -> int:
        """How many connections the pool may hold now (UNBOUNDED: no limit)."""
        return compat.connection_limit(self)

    @property
    def connections(self) -> int:
        """Physical connections held (idle or checked out) and empty records kept."""
        return compat.connection_count(self)

    def resize(self, limit: int, *, wake: bool = True) -> None:
        """Hold at most ``limit`` (>= 1) connections from now on (the keeper's share).

        Growing hands empty records to threads waiting in the queue (each
        connects, through the budget); shrinking drops empty records
        (connections the budget closed) beyond the bound. Checked-out
        connections over the bound go when they come back empty.
        ``wake=False``: grow without serving the waiters now.
        """
        if limit <= 0 or self._permits is None:
            return
        grew = limit > self.limit
        compat.set_connection_limit(self, limit)
        if wake and grew:
            self.fair.dispatch(self)
        for _ in range(compat.idle_count(self)):
            if self.connections <= limit:
                return
            record = compat.take_idle(self)
            if record is None:
                return
            if record.dbapi_connection is None:
                compat.forget_connection(self)
            else:
                compat.put_idle(self, record)

    def shed_idle(self, wanted: int) -> int:
        """Close up to ``wanted`` idle connections; how many were closed.

        The record stays in the pool, empty; its next checkout reconnects (and
        asks for a permit again). Closing gives the permit back.
        """
        closed = 0
        for _ in range(compat.idle_count(self)):
            if closed >= wanted:
                break
            record = compat.take_idle(self)
            if record is None:
                break
            try:
                if record.dbapi_connection is not None:
                    record.invalidate()
                    closed += 1
            finally:
                compat.put_idle(self, record)
        self.fair.dispatch(self)  # a waiter may have missed a record we held meanwhile
        return closed

    # -- QueuePool's template methods ------------------------------------------

    def _do_get(self) -> Any:
        """A record to check out, in turn (see FairQueue); surplus empty records go."""
        return self.fair.get(self, request_source.get())

    def _do_return_conn(self, record: Any) -> None:
        """Check-in: a connection the keeper wants back (a shed token) is closed first."""
        if self._shed:  # (empty: no budget of the process sheds; the common case)
            tokens = self._shed.get(self.budget_key)  # type: ignore[arg-type]
            live = record.dbapi_connection is not None
            if tokens is not None and live and next(tokens, None) is not None:
                record.invalidate()  # closes it: _close_connection frees the permit
        self.fair.checkin(self, record)

    def _close_connection(self, connection: Any, *args: Any, **kwargs: Any) -> None:
        """Every physical close of this pool's connections passes here: free the permit."""
        lease = self._leases.pop(id(connection), None)
        try:
            if lease is not None and self._permits is not None:
                self._permits.closing(connection, lease)
        finally:
            super()._close_connection(connection, *args, **kwargs)  # twice is harmless

    def recreate(self) -> BudgetedQueuePool:
        """The pool that replaces this one after ``engine.dispose()``: same budget, same share."""
        pool = super().recreate()
        assert isinstance(pool, BudgetedQueuePool)
        pool.own_limit = self.own_limit
        pool.connection_shares = self.connection_shares
        pool.fair = FairQueue(self.connection_shares)
        compat.set_connection_limit(pool, self.own_limit)
        if self._permits is not None and self.budget_key is not None:
            pool.attach(self._permits, self.budget_key, self.cap, limit=self.limit)
        return pool

    def dispose(self) -> None:
        """Close the idle connections (their permits go back); checked-out ones still count."""
        while (record := compat.take_idle(self)) is not None:
            record.close()
            compat.forget_connection(self)
        self.logger.info("Pool disposed. %s", self.status())

    def status(self) -> str:
        limit = "unbounded" if self.limit == compat.UNBOUNDED else str(self.limit)
        budget = f"budget {self.budget_key} (max_connections={self.cap})" if self._permits else (
            "no budget yet"
        )
        return (
            f"Budgeted pool, {budget}: limit {limit}, connections {self.connections}, "
            f"in pool {self.checkedin()}, checked out {self.checkedout()}"
        )

    # -- what a FairQueue needs (enginehouse.shares.SharedPool) -------------------

    def take_idle_record(self) -> Any | None:
        """An idle record without waiting (surplus empty ones are dropped), or None."""
        while (record := compat.take_idle(self)) is not None:
            if not self._drop_if_surplus(record):
                return record
        return None

    def grow_record(self) -> Any | None:
        """An empty record counted against the bound (its checkout connects), or None if full."""
        return compat.empty_record(self) if compat.reserve_connection(self) else None

    def put_idle_record(self, record: Any) -> None:
        """Put ``record`` (back) among the idle ones; an empty one leaves the pool.

        Empty: its connect failed (QueuePool uncounts it too) or its connection
        was invalidated; the next checkout that needs one grows a new record.
        """
        if record.dbapi_connection is None:
            compat.forget_connection(self)
        else:
            compat.put_idle(self, record)

    def exhausted(self, timeout: float) -> Exception:
        """The error of a checkout that waited ``timeout`` s: named after the budget."""
        if self._permits is None:  # (QueuePool's own, before the budget is attached)
            return sa_exc.TimeoutError(
                f"QueuePool limit of size {self.limit} reached, connection timed out, "
                f"timeout {timeout:g}"
            )
        return PoolExhaustedError(
            f"budget {self.budget_key}: no connection within pool_timeout={timeout:g}s "
            f"(max_connections={self.cap}; all of this pool's share in use)"
        )

    # -- internals ---------------------------------------------------------------

    def _connect_with_permit(self, connect: compat.Creator) -> compat.Creator:
        pool = self

        def connect_with_permit(connection_record: Any = None) -> Any:
            permits, key = pool._permits, pool.budget_key
            if permits is None or key is None:
                return connect(connection_record)
            lease = permits.acquire(key, pool.cap, pool.timeout())
            try:
                connection = connect(connection_record)
            except BaseException:
                permits.release(lease)
                raise
            pool._track(connection, lease, permits)
            return connection

        return connect_with_permit

    def _track(self, connection: Any, lease: Any, permits: PermitSource) -> None:
        leases = self._leases
        leases[id(connection)] = lease
        # Safety net: a connection dropped without a close still frees its permit
        # (a driver whose connections take no weak references relies on the close only).
        with contextlib.suppress(TypeError):
            weakref.finalize(connection, _forget, leases, id(connection), permits).atexit = False

    def _drop_if_surplus(self, record: Any) -> bool:
        """Drop ``record`` if it is empty and the pool holds more records than its limit.

        After the budget shrinks a pool, the pool keeps its extra records until
        they come back; one whose connection was closed (shed) must not connect
        again, or each of its checkouts would take a permit from a live
        connection of the same pool, over and over. True when dropped.
        """
        if record is None or record.dbapi_connection is not None:
            return False
        limit = self.limit
        if limit == compat.UNBOUNDED or self.connections <= limit:
            return False
        compat.forget_connection(self)
        return True


def _forget(leases: dict[int, Any], connection_id: int, permits: PermitSource) -> None:
    lease = leases.pop(connection_id, None)
    if lease is not None:
        permits.release(lease)
