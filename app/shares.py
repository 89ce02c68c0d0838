"""Fair sharing of one pool's connections by request source (``extra.connection_shares``).

A BI server runs dashboards and long SQL Lab queries on the same database; under
a cap, first come first served lets eight long queries freeze every dashboard.
With ``connection_shares`` (source -> weight, ``"*"`` for the sources not named)
the pool's wait queue becomes one FIFO per source: a connection that comes back
goes to the waiting source furthest below its weighted share of the connections
checked out right now (checked out / weight, lowest first). Nobody waits while a
connection is idle or the pool may open one, so a source alone may use the whole
cap (work-conserving); under contention each source converges to at least its
weighted share, because every hand-over goes to the least served waiting source.

The source of a checkout is :data:`request_source`, which ``EngineManager.connect()``
sets around ``engine.connect()``. No lock: waiters are per-source ``deque``s
(append/popleft/remove are atomic in CPython), each waiter gets its connection
through its own ``queue.SimpleQueue``, and every party publishes first (a waiter
enqueues, a returner puts the connection back) and dispatches second, so a
connection and a waiter never miss each other.
"""

from __future__ import annotations

import contextvars
import queue
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

from enginehouse.errors import PoolExhaustedError

request_source: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "enginehouse_request_source", default=None
)
"""The ``source`` of the request checking a connection out (set by ``manager.connect``)."""

OTHERS = "*"
"""The share of every source the mapping does not name (weight 1 when not given)."""


def pool_argument(database_id: Any, shares: Mapping[str, Any]) -> dict[str, Any]:
    """A validated ``extra.connection_shares`` as the pool's ``connection_shares`` argument.

    Plain JSON (it is part of the engine key's digest): the database for
    errors, a weight and an optional ``pool_timeout`` per source.
    """
    weights: dict[str, float] = {}
    timeouts: dict[str, float] = {}
    for source, share in shares.items():
        if isinstance(share, Mapping):
            weights[source] = float(share["weight"])
            if share.get("pool_timeout") is not None:
                timeouts[source] = float(share["pool_timeout"])
        else:
            weights[source] = float(share)
    return {"database": str(database_id), "weights": weights, "timeouts": timeouts}


class SharedPool(Protocol):
    """What :class:`FairQueue` needs from its pool (BudgetedQueuePool)."""

    def take_idle_record(self) -> Any | None:
        """An idle record without waiting, or None."""

    def grow_record(self) -> Any | None:
        """An empty record if the pool may hold one more connection, else None."""

    def put_idle_record(self, record: Any) -> None:
        """Put a record back among the idle ones."""

    def timeout(self) -> float:
        """The pool's own ``pool_timeout``."""


class _Waiter:
    """One thread waiting for a connection; a dispatcher puts its record in ``slot``."""

    __slots__ = ("slot", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.slot: queue.SimpleQueue[Any] = queue.SimpleQueue()


class FairQueue:
    """A pool's wait queue, one FIFO per source, served by weighted share; see the module."""

    def __init__(self, argument: Mapping[str, Any]) -> None:
        self.database: str = argument["database"]
        self.weights: dict[str, float] = {OTHERS: 1.0, **argument["weights"]}
        self.timeouts: dict[str, float] = dict(argument.get("timeouts") or {})
        self._waiting: dict[str, deque[_Waiter]] = {s: deque() for s in self.weights}
        self._held: dict[str, dict[int, None]] = {s: {} for s in self.weights}
        self._holder: dict[int, str] = {}  # id(record) -> the source holding it

    def share_of(self, source: str | None) -> str:
        """The share ``source`` draws on: its own, else ``"*"``."""
        return source if source in self.weights else OTHERS  # type: ignore[return-value]

    def checked_out(self) -> dict[str, int]:
        """Connections checked out now, by share."""
        return {source: len(held) for source, held in self._held.items()}

    def waiting(self) -> dict[str, int]:
        """Threads waiting now, by share."""
        return {source: len(waiters) for source, waiters in self._waiting.items()}

    # -- checkout and check-in --------------------------------------------------

    def get(self, pool: SharedPool, source: str | None) -> Any:
        """A record for a checkout by ``source``: at once if nobody waits, else in turn."""
        share = self.share_of(source)
        if not self._anyone_waiting():
            record = pool.take_idle_record() or pool.grow_record()
            if record is not None:
                self._note_out(record, share)
                return record
        waiter = _Waiter(share)
        self._waiting[share].append(waiter)
        self.dispatch(pool)
        timeout = self.timeouts.get(share, pool.timeout())
        try:
            return waiter.slot.get(timeout=timeout)
        except queue.Empty:
            try:
                self._waiting[share].remove(waiter)
            except ValueError:  # a dispatcher took it just now: its record is on the way
                return waiter.slot.get()
            raise PoolExhaustedError(
                f"database {self.database}, source {source or OTHERS}: no connection within "
                f"pool_timeout={timeout:g}s (connection_shares: share {share!r}, "
                f"weight {self.weights[share]:g}; all connections in use)"
            ) from None

    def checkin(self, pool: SharedPool, record: Any) -> None:
        """``record`` came back: forget its holder, hand it to the least served waiter."""
        share = self._holder.pop(id(record), None)
        if share is not None:
            self._held[share].pop(id(record), None)
        pool.put_idle_record(record)
        self.dispatch(pool)

    def dispatch(self, pool: SharedPool) -> None:
        """Hand idle (or new, empty) records to waiters while both exist."""
        while self._anyone_waiting():
            record = pool.take_idle_record() or pool.grow_record()
            if record is None:
                return
            waiter = self._least_served()
            if waiter is None:  # the waiters left (timed out or served) meanwhile
                pool.put_idle_record(record)
                continue
            self._note_out(record, waiter.source)
            waiter.slot.put(record)

    # -- internals ----------------------------------------------------------------

    def _anyone_waiting(self) -> bool:
        return any(self._waiting.values())

    def _least_served(self) -> _Waiter | None:
        """Pop the first waiter of the waiting share with the fewest connections per weight."""
        while True:
            loads = [
                (len(self._held[share]) / self.weights[share], -self.weights[share], share)
                for share, waiters in self._waiting.items()
                if waiters
            ]
            if not loads:
                return None
            try:
                return self._waiting[min(loads)[2]].popleft()
            except IndexError:  # another dispatcher served it first
                continue

    def _note_out(self, record: Any, share: str) -> None:
        self._holder[id(record)] = share
        self._held[share][id(record)] = None
