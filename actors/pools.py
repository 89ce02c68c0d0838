"""Pool plumbing for connection budgets: sizing QueuePools at run time, shedding.

The BudgetKeeper decides how many connections each budget's pools may keep
and how many must be given back; this module does it to SQLAlchemy's
QueuePool. It relies on QueuePool internals (``_pool``, ``_overflow``,
``_max_overflow``, ``_inc_overflow``/``_dec_overflow``): the one place to look
when SQLAlchemy changes them. :class:`ShareBoard` is where the keeper publishes
its decisions for the check-in listeners of :mod:`enginehouse.budget_client`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy.pool.base import _ConnectionRecord
from sqlalchemy.util import queue as sqla_queue


class ShareBoard:
    """Where the keeper publishes shed tokens, read lock-free by check-in listeners.

    ``shed[key]`` is an iterator; ``next()`` on it is atomic, so each token
    closes exactly one checked-in connection. The keeper replaces it whole.
    """

    __slots__ = ("limits", "shed")

    def __init__(self) -> None:
        self.shed: dict[str, Iterator[int]] = {}
        self.limits: dict[str, int] = {}
        """Per budget, how many connections each of its pools may keep (our share)."""


def close_idle(engines: Iterable[tuple[weakref.ref[Any], int]], wanted: int) -> int:
    """Close up to ``wanted`` idle pooled connections of ``engines`` (weak refs, limits).

    The record stays in its pool, empty; its next checkout reconnects (and
    asks for a permit again). Closing fires the pool's ``close`` event, whose
    listener releases the lease.
    """
    closed = 0
    for ref, _limit in engines:
        engine = ref()
        pool = getattr(engine, "pool", None)
        idle = getattr(pool, "_pool", None)  # QueuePool's queue of idle records
        if idle is None:
            continue
        for _ in range(idle.qsize()):
            if closed >= wanted:
                return closed
            try:
                record = idle.get(False)
            except sqla_queue.Empty:
                break
            try:
                if record.dbapi_connection is not None:
                    record.invalidate()
                    closed += 1
            finally:
                try:
                    idle.put(record, False)
                except sqla_queue.Full:
                    pool._dec_overflow()  # type: ignore[union-attr]
    return closed


def prepare_pool(pool: Any, cap: int) -> int:
    """Turn a fresh QueuePool's ``pool_size + max_overflow`` into one bound; return it.

    The budget resizes pools at run time (a process's fair share changes as
    processes come and go), which QueuePool only supports through its overflow
    counter: so the queue is made unbounded (``maxsize=0``) and
    ``max_overflow`` becomes the total. ``stats()`` then reports ``size`` 0
    and ``overflow`` = connections. Returns the engine's own limit (<= cap);
    0 for pools that are not QueuePools (the creator still enforces the cap).
    """
    idle = getattr(pool, "_pool", None)
    overflow = getattr(pool, "_max_overflow", None)
    if idle is None or overflow is None:
        return 0
    size = idle.maxsize
    limit = cap if size == 0 or overflow == -1 else min(cap, size + overflow)
    idle.maxsize = 0
    pool._overflow = 0  # no connection exists yet: it now counts connections
    pool._max_overflow = limit
    return limit


def limit_pool(pool: Any, limit: int, *, wake: bool = True) -> None:
    """Let a prepared QueuePool hold at most ``limit`` connections (>= 1).

    Threads already blocked in the pool's queue never look at the bound
    again: growing puts an empty record in the queue when none is idle (the
    thread that takes it connects, through the budget); shrinking drops empty
    records (connections the budget closed) beyond the bound.
    """
    idle = getattr(pool, "_pool", None)
    if idle is None or idle.maxsize != 0 or not hasattr(pool, "_max_overflow") or limit <= 0:
        return
    grew = limit > pool._max_overflow
    pool._max_overflow = limit
    if wake and grew and idle.qsize() == 0 and pool._overflow < limit and pool._inc_overflow():
        # Nothing idle: threads may be blocked in the queue. One empty record wakes
        # one of them; it connects, and the next grant grows the pool again.
        idle.put(_ConnectionRecord(pool, connect=False), False)
    for _ in range(idle.qsize()):
        if pool._overflow <= limit:
            return
        try:
            record = idle.get(False)
        except sqla_queue.Empty:
            return
        if record.dbapi_connection is None:
            pool._dec_overflow()
        else:
            idle.put(record, False)


def drop_if_surplus(pool: Any, record: Any) -> bool:
    """Drop ``record`` if it is empty and its pool holds more records than its limit.

    After a budget shrinks a pool (a fair share got smaller), the pool keeps
    its extra records until they come back; one whose connection was closed
    (shed) must not connect again, or each of its checkouts would take a
    permit from a live connection of the same pool, over and over. True when
    dropped: the caller checks out another record.
    """
    if record is None or getattr(record, "dbapi_connection", True) is not None:
        return False
    limit = getattr(pool, "_max_overflow", -1)
    if limit < 0 or pool._overflow <= limit:
        return False
    pool._dec_overflow()
    return True
