"""Conversation with the BudgetKeeper actor (connection and tunnel budgets).

A physical connect costs one :class:`Acquire` tell, answered on a future the
caller made; everything else is a ``tell`` (releases, cancels, renewals, the
LeaseWaiter's news) or a rare ask (stats). Queries on an already pooled
connection send nothing.
"""

from __future__ import annotations

import socket
import weakref
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Lease:
    """A permit for one physical connection (or SSH session) of budget ``key``.

    ``generation`` is the fork generation that granted it: a lease inherited
    across ``fork()`` belongs to the parent and is never released by the child.
    """

    key: str
    lease_id: str
    generation: int


class Claim:
    """Who decides a permit's fate, the keeper or the waiting caller: whoever takes it first.

    The keeper takes the claim before it grants a permit; a caller that gives
    up (its deadline passed) takes it before it leaves. Exactly one of them
    succeeds (``list.pop`` is atomic), so a permit is never granted to a
    caller who already left, and a caller never leaves while a permit is on
    its way to it. No lock: one token in a list.
    """

    __slots__ = ("_token",)

    def __init__(self) -> None:
        self._token = [True]

    def take(self) -> bool:
        """True for the first taker only."""
        try:
            self._token.pop()
        except IndexError:
            return False
        return True

    @property
    def open(self) -> bool:
        """Nobody has taken it yet (the caller still waits, no permit is on its way)."""
        return bool(self._token)


@dataclass(frozen=True)
class Acquire:
    """Tell: a permit of ``key`` for the caller waiting on ``reply`` until ``deadline``.

    ``deadline`` is ``time.monotonic()`` at which the caller gives up: the
    keeper never grants after it, and grants only after taking ``claim``
    (a caller who left has taken it). Waiters are served first come, first
    served. ``reply`` gets the :class:`Lease`, or one of our errors.
    """

    key: str
    cap: int
    ticket: int
    deadline: float
    reply: Any  # pykka.ThreadingFuture[Lease], set by the keeper only
    claim: Claim


@dataclass(frozen=True)
class Cancel:
    """Tell: the caller of ``ticket`` gave up (it holds the claim); drop its waiter now."""

    key: str
    ticket: int


@dataclass(frozen=True)
class Release:
    """Tell: the connection holding ``lease_id`` was closed."""

    key: str
    lease_id: str


@dataclass(frozen=True)
class StartWaiting:
    """Tell (keeper to its LeaseWaiter): block in Redis for ONE more permit of ``key``.

    The waiter blocks until it has caught as many permits as it was asked for
    (each StartWaiting asks for one), or until :class:`StopWaiting`. So the
    permits that are ours in Redis before the keeper has heard of them never
    outnumber the StartWaitings the keeper has not seen answered: it counts
    them, and a renewal never takes back a permit on its way to it.
    """


@dataclass(frozen=True)
class StopWaiting:
    """Tell (keeper to its LeaseWaiter): no caller waits any more; stop blocking."""


@dataclass(frozen=True)
class WaitEnded:
    """Tell (LeaseWaiter to keeper): one blocking wait in Redis ended.

    ``got``: a permit of ``key`` is now ours in Redis (the keeper hands it to
    its oldest waiter, or gives it back). ``failed``: Redis did not answer,
    or the waiter crashed (the keeper starts another one when it needs to).
    ``refused``: Redis answered the wait with an error (its code, e.g.
    ``WRONGTYPE``): the keeper fails its waiters with our error. ``stopped``:
    the waiter read StopWaiting (nothing caught). ``answered``: how many
    StartWaitings this report answers (1 for a permit caught; every one still
    open after a failure or a stop; 0 for an empty wait, after which the
    waiter blocks again).
    """

    key: str
    got: bool
    failed: bool = False
    refused: str | None = None
    stopped: bool = False
    answered: int = 0


@dataclass(frozen=True)
class WatchClose:
    """Tell (to the DisconnectWatcher): ``watch`` duplicates a just-closed connection's socket; give
    ``lease`` back once the server has dropped the connection (or ``closed_at`` + the
    DisconnectWatcher's bound has passed)."""

    watch: socket.socket
    lease: Lease
    closed_at: float
    """``time.monotonic()`` when the connection was closed."""


@dataclass(frozen=True)
class RecomputeShare:
    """Tell (keeper to the other keepers of the process, embedded): someone's waiting for
    ``key`` started or ended; recompute your fair share and give back what exceeds it."""

    key: str


@dataclass(frozen=True)
class Attach:
    """Tell: ``engine`` draws on budget ``key``; its idle connections may be shed for waiters."""

    key: str
    cap: int
    engine: weakref.ref[Any]
    limit: int
    """The engine's own bound on connections (pool_size + max_overflow, at most cap)."""


@dataclass(frozen=True)
class Renew:
    """Tell (from the Janitor's round): renew fleet leases, reconcile, rebalance, expire waiters."""


@dataclass(frozen=True)
class GetBudgetStats:
    """Ask: a tuple of :class:`BudgetStatus`."""


@dataclass(frozen=True)
class BudgetStatus:
    """One budget as the keeper sees it."""

    key: str
    cap: int
    mode: str
    """``local`` (embedded), ``fleet``, ``fleet-down`` (fail closed) or ``fleet-fallback``."""
    held: int
    waiting: int
    granted: int
    timeouts: int
    shed: int
    fleet_held: int | None
    fleet_waiting: int | None
    fleet_processes: int | None
    round_trips: int
    """Redis round trips made for this budget (0 when embedded); the sum of the next three."""
    acquire_round_trips: int = 0
    """Round trips spent getting permits: a first ask, then one per blocking wait."""
    release_round_trips: int = 0
    renew_round_trips: int = 0
    blocking_waits: int = 0
    """Of the acquire round trips, those spent blocked in Redis (a permit, or 5 s passed)."""
    empty_waits: int = 0
    """Of the blocking waits, those that ended without a permit (after 5 s)."""
    refusals: int = 0
    """First asks the fleet (or the process's ledger) refused: each starts a wait."""
    handovers: int = 0
    """Permits a closing connection passed to a waiter of this process, with no round trip."""
    demand_news: int = 0
    """Renewals made at once because another process started or stopped waiting (fleet)."""


@dataclass(frozen=True)
class DemandChanged:
    """Tell (DemandListener to keeper): ``process`` started or stopped waiting for ``key``.

    The keeper renews that budget at once: it learns who waits, recomputes
    its fair share and gives back what exceeds it at the next check-ins.
    """

    key: str
    process: str
