"""A capped pool's wait queue: first come, first served, or fair by request source.

Every BudgetedQueuePool waits here (one waiting mechanism). Without
``connection_shares`` there is one source (``"*"``) and the queue is plain
FIFO with a hand-off: a connection that comes back goes to the longest
waiter, and a new checkout never overtakes a thread already waiting
(SQLAlchemy's QueuePool lets the thread that just returned a connection take it
right back, so under a closed loop whoever holds the pool keeps it). Nobody
waiting, a checkout takes a free connection at once, with no thread hand-off.

A BI server runs dashboards and long SQL Lab queries on the same database; under
a cap, first come first served lets eight long queries freeze every dashboard.
With ``connection_shares`` (source -> weight, ``"*"`` for the sources not named)
the wait queue becomes one FIFO per source, and each *active* source is
entitled to ``limit * weight / (sum of the active sources' weights)``
connections. A source is active while it holds or waits for a connection, or
asked for one in the last :data:`ACTIVE_FOR` seconds (a dashboard between two
queries still counts). A source below its entitlement always may take a free
connection; one at or above it only may take what the other active sources'
unmet entitlements leave free. A connection that comes back goes to the waiting
source furthest below its share (checked out / weight, lowest first) among
those that may take it, and within a source to its longest waiter. So a
source alone (the others idle) uses the whole cap (work-conserving); under
contention every active source gets at least its weighted share as soon as
connections come back, and a bursty source (dashboards with think time) finds
its share free instead of held by 2-second SQL Lab queries.

The source of a checkout is :data:`request_source`, which ``EngineManager.connect()``
sets around ``engine.connect()``. No lock: waiters are per-source ``deque``s
(append/popleft/remove are atomic in CPython), each waiter gets its connection
through its own ``queue.SimpleQueue``, and every party publishes first (a waiter
enqueues, a returner puts the connection back) and dispatches second, so a
connection and a waiter never miss each other. (A checkout that finds nobody
waiting may still pass a thread that starts waiting at that very moment.)
"""

from __future__ import annotations

import contextvars
import queue
import time
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

ACTIVE_FOR = 2.0
"""Seconds a source stays active (keeps its share free) after its last checkout or check-in."""

UNBOUNDED = -1
"""A pool limit that is none (then nobody waits and shares do nothing)."""


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

    def exhausted(self, timeout: float) -> Exception:
        """The pool's own error for a checkout that waited ``timeout`` s (no shares)."""

    @property
    def limit(self) -> int:
        """How many connections the pool may hold now (UNBOUNDED: no limit)."""


class _Waiter:
    """One thread waiting for a connection; a dispatcher puts its record in ``slot``."""

    __slots__ = ("slot", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.slot: queue.SimpleQueue[Any] = queue.SimpleQueue()


class FairQueue:
    """A pool's wait queue, one FIFO per source, served by weighted share; see the module.

    ``argument`` None: no shares, one FIFO for every checkout.
    """

    def __init__(self, argument: Mapping[str, Any] | None = None) -> None:
        argument = argument or {"database": "", "weights": {}}
        self.shared = bool(argument["weights"])
        """Whether ``connection_shares`` are set (else one source, plain FIFO)."""
        self.database: str = argument["database"]
        self.weights: dict[str, float] = {OTHERS: 1.0, **argument["weights"]}
        self.timeouts: dict[str, float] = dict(argument.get("timeouts") or {})
        self._waiting: dict[str, deque[_Waiter]] = {s: deque() for s in self.weights}
        self._held: dict[str, dict[int, None]] = {s: {} for s in self.weights}
        self._holder: dict[int, str] = {}  # id(record) -> the source holding it
        self._seen: dict[str, float] = {}  # share -> monotonic time of its last checkout/checkin

    def share_of(self, source: str | None) -> str:
        """The share ``source`` draws on: its own, else ``"*"``."""
        return source if source is not None and source in self.weights else OTHERS

    def checked_out(self) -> dict[str, int]:
        """Connections checked out now, by share."""
        return {source: len(held) for source, held in self._held.items()}

    def waiting(self) -> dict[str, int]:
        """Threads waiting now, by share."""
        return {source: len(waiters) for source, waiters in self._waiting.items()}

    def demand(self) -> dict[str, float]:
        """The active shares and their weights (what the fleet weighs this pool's demand by)."""
        now = time.monotonic()
        return {s: w for s, w in self.weights.items() if self._active(s, now)}

    # -- checkout and check-in --------------------------------------------------

    def get(self, pool: SharedPool, source: str | None) -> Any:
        """A record for a checkout by ``source``: at once if nobody waits, else in turn."""
        share = self.share_of(source)
        self._seen[share] = now = time.monotonic()
        if not self._anyone_waiting() and self._may_take(share, pool.limit, now):
            record = pool.take_idle_record() or pool.grow_record()
            if record is not None:
                self._note_out(record, share)
                return record
        waiter = _Waiter(share)
        self._waiting[share].append(waiter)
        self.dispatch(pool)
        timeout = self.timeouts.get(share, pool.timeout())
        deadline = now + timeout
        while True:
            try:  # wake now and then: a share kept free for a source that went idle frees up
                return waiter.slot.get(timeout=max(0.0, min(deadline - time.monotonic(), 0.5)))
            except queue.Empty:
                if time.monotonic() < deadline:
                    self.dispatch(pool)
                    continue
            try:
                self._waiting[share].remove(waiter)
            except ValueError:  # a dispatcher took it just now: its record is on the way
                return waiter.slot.get()
            if not self.shared:
                raise pool.exhausted(timeout) from None
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
            self._seen[share] = time.monotonic()
        pool.put_idle_record(record)
        self.dispatch(pool)

    def dispatch(self, pool: SharedPool) -> None:
        """Hand idle (or new, empty) records to waiters while both exist."""
        while self._anyone_waiting():
            share = self._least_served(pool.limit)
            if share is None:  # nobody waiting may take one: free ones stay for their shares
                return
            record = pool.take_idle_record() or pool.grow_record()
            if record is None:
                return
            try:
                waiter = self._waiting[share].popleft()
            except IndexError:  # another dispatcher served it, or it timed out, meanwhile
                pool.put_idle_record(record)
                continue
            self._note_out(record, waiter.source)
            waiter.slot.put(record)

    # -- internals ----------------------------------------------------------------

    def _anyone_waiting(self) -> bool:
        return any(self._waiting.values())

    def _least_served(self, limit: int) -> str | None:
        """The waiting share with the fewest connections per weight that may take one."""
        now = time.monotonic()
        loads = [
            (len(self._held[share]) / self.weights[share], -self.weights[share], share)
            for share, waiters in self._waiting.items()
            if waiters and self._may_take(share, limit, now)
        ]
        return min(loads)[2] if loads else None

    def _may_take(self, share: str, limit: int, now: float) -> bool:
        """Whether ``share`` may have one more connection now (see the module docstring)."""
        if limit == UNBOUNDED or not self.shared:
            return True
        active = [s for s in self.weights if self._active(s, now)]
        if share not in active:
            active.append(share)
        total = sum(self.weights[s] for s in active)
        held = {s: len(self._held[s]) for s in active}
        if held[share] < limit * self.weights[share] / total:
            return True
        unmet = sum(
            max(0.0, limit * self.weights[s] / total - held[s]) for s in active if s != share
        )
        free = limit - sum(len(h) for h in self._held.values())
        return free > unmet

    def _active(self, share: str, now: float) -> bool:
        if self._held[share] or self._waiting[share]:
            return True
        return now - self._seen.get(share, float("-inf")) < ACTIVE_FOR

    def _note_out(self, record: Any, share: str) -> None:
        self._holder[id(record)] = share
        self._held[share][id(record)] = None
