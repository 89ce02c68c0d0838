"""Conversation with the BudgetKeeper actor (connection and tunnel budgets).

A physical connect costs one :class:`Acquire` ask; everything else is a
``tell`` (releases, renewals, the LeaseWaiter's news) or a rare ask (cancel,
stats). Queries
on an already pooled connection send nothing.
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


@dataclass(frozen=True)
class Acquire:
    """Ask: a ``ThreadingFuture[Lease]``, already set when a permit is free.

    The caller waits on that future for at most ``timeout`` seconds; waiters
    are served first come, first served.
    """

    key: str
    cap: int
    ticket: int
    timeout: float


@dataclass(frozen=True)
class Cancel:
    """Ask: stop waiting; answers the :class:`Lease` if one was granted meanwhile, else None."""

    key: str
    ticket: int


@dataclass(frozen=True)
class Release:
    """Tell: the connection holding ``lease_id`` was closed."""

    key: str
    lease_id: str


@dataclass(frozen=True)
class StartWaiting:
    """Tell (keeper to its LeaseWaiter): block in Redis for permits of ``key`` until StopWaiting."""


@dataclass(frozen=True)
class StopWaiting:
    """Tell (keeper to its LeaseWaiter): no caller waits any more; stop blocking."""


@dataclass(frozen=True)
class WaitEnded:
    """Tell (LeaseWaiter to keeper): one blocking wait in Redis ended.

    ``got``: a permit of ``key`` is now ours in Redis (the keeper hands it to
    its oldest waiter, or gives it back). ``failed``: Redis did not answer.
    """

    key: str
    got: bool
    failed: bool = False


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
