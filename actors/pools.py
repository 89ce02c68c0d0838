"""What the BudgetKeeper does to pools: resize them to its shares, shed idle connections.

The keeper decides how many connections each budget's pools may keep and how
many must be given back; a :class:`~enginehouse.budgeted_pool.BudgetedQueuePool`
does it (other pool classes only take permits per connect, so there is nothing
to resize). :class:`ShareBoard` is where the keeper publishes its decisions for
the pools' check-ins.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import Any

from enginehouse.budgeted_pool import BudgetedQueuePool


class ShareBoard:
    """Where the keeper publishes shed tokens, read lock-free on check-in.

    ``shed[key]`` is an iterator; ``next()`` on it is atomic, so each token
    closes exactly one checked-in connection. The keeper replaces it whole.
    """

    __slots__ = ("keeper", "limits", "shed")

    def __init__(self) -> None:
        self.shed: dict[str, Iterator[int]] = {}
        self.limits: dict[str, int] = {}
        """Per budget, how many connections each of its pools may keep (our share)."""
        self.keeper: Any = None
        """The keeper running now, set first thing in its ``on_start``: a restarted keeper
        adopting permits may close connections at once, and their releases must reach it,
        not the dead one (``start()`` may not have returned its reference yet)."""


def close_idle(engines: Iterable[tuple[weakref.ref[Any], int]], wanted: int) -> int:
    """Close up to ``wanted`` idle pooled connections of ``engines`` (weak refs, limits).

    Each closed connection gives its permit back; its record stays in the pool,
    empty, and reconnects (asking for a permit again) on its next checkout.
    """
    closed = 0
    for ref, _limit in engines:
        pool = getattr(ref(), "pool", None)
        if closed >= wanted:
            break
        if isinstance(pool, BudgetedQueuePool):
            closed += pool.shed_idle(wanted - closed)
    return closed


def limit_pool(pool: Any, limit: int) -> None:
    """Let a budgeted pool hold at most ``limit`` connections (>= 1; others: nothing to do)."""
    if isinstance(pool, BudgetedQueuePool):
        pool.resize(limit)
