"""Embedded budgets, shared by every manager of the process.

Without ``fleet_url`` a database's cap must hold across all engines of the
process, whichever :class:`~enginehouse.manager.EngineManager` made them (say a Flask
extension's manager and the default ``engines``). Each budget is a queue of
``cap`` permit tokens, the in-process twin of the fleet's Redis free list:

- a keeper takes a token without blocking (:meth:`LocalLedger.take`);
- when none is left, its LeaseWaiter blocks on the queue (:meth:`LocalLedger.wait`)
  and gets the next token any manager gives back, first come, first served;
- a closed connection's token goes back into the queue (:meth:`LocalLedger.give`).

No lock of ours: tokens move through ``queue.SimpleQueue`` and every field is
written by one thread only (a member's own keeper, or its LeaseWaiter). Each
member also says whether it waits, so the others can give back what they hold
beyond their fair share, and members whose keeper died are reaped: their
tokens go back to the queue.

Budgets are per namespace (the ``fleet_prefix`` setting) and per process: a
forked child starts with full queues of its own.
"""

from __future__ import annotations

import itertools
import os
import queue
import weakref
from collections import deque
from typing import Any, NamedTuple

import pykka

from enginehouse.fleet import Renewal

_TOKEN = object()


class Holdings:
    """The permits one manager's live connections hold, kept outside its keeper.

    A keeper that crashes loses its memory, not the permits: the restarted
    keeper reads this record (same ``process`` identity, so the same Redis
    ``taken`` list and the same embedded ledger member) and adopts every
    permit still held, so the cap holds across the restart. The keeper adds
    a lease when it grants it; the caller drops it when its connection has
    gone (before telling the keeper), so the record lists exactly the
    permits in use even when a Release dies in a crashed keeper's mailbox.
    One per manager and process (a forked child makes a new one).
    """

    def __init__(self, process: str) -> None:
        self.process = process
        self._ids = itertools.count(1)
        self._leases: dict[str, tuple[str, int]] = {}  # lease id -> (budget key, cap)
        # Engines drawing on each budget (weak refs, their limits): re-attached after a restart.
        self.engines: dict[str, tuple[int, list[tuple[weakref.ref[Any], int]]]] = {}

    def new_id(self) -> str:
        """A lease id no keeper of this record has used (``next`` on a count is atomic)."""
        return f"{self.process}|{next(self._ids)}"

    def add(self, lease_id: str, key: str, cap: int) -> None:
        self._leases[lease_id] = (key, cap)

    def drop(self, lease_id: str) -> None:
        self._leases.pop(lease_id, None)

    def attach(self, key: str, cap: int, engine: weakref.ref[Any], limit: int) -> None:
        """Remember that ``engine`` draws on ``key`` (keeper thread)."""
        _, engines = self.engines.get(key, (cap, []))
        live = [(r, n) for r, n in engines if r() is not None]
        self.engines[key] = (cap, [*live, (engine, limit)])

    def count(self, key: str) -> int:
        """Permits of budget ``key`` held now."""
        return sum(1 for k, _ in list(self._leases.values()) if k == key)

    def by_budget(self) -> dict[str, tuple[int, list[str]]]:
        """``{key: (cap, lease ids)}``: what a restarted keeper adopts."""
        out: dict[str, tuple[int, list[str]]] = {}
        for lease_id, (key, cap) in list(self._leases.items()):
            out.setdefault(key, (cap, []))[1].append(lease_id)
        return out

WAIT_BLOCK = 0.5
"""Seconds a LeaseWaiter blocks on the queue at a time: no network here, so short,
which lets a stopped manager's waiter thread end quickly."""


class _Member:
    """One keeper's stake in a budget.

    The counters have one writer each, so no update is lost between the
    keeper's thread and its waiter's thread.
    """

    __slots__ = ("given", "got", "holdings", "keeper", "returned", "taken", "waiting")

    def __init__(self, keeper: pykka.ActorRef[Any], holdings: Holdings | None) -> None:
        self.keeper = keeper  # replaced when a restarted keeper adopts the member
        # The manager's record of permits in use (weak: a collected manager is reapable).
        self.holdings = weakref.ref(holdings) if holdings is not None else lambda: None
        self.taken = 0  # keeper: tokens taken without waiting
        self.given = 0  # keeper: tokens given back
        self.got = 0  # waiter: tokens that reached it
        self.returned = 0  # waiter: tokens it put back (its keeper had stopped)
        self.waiting = 0  # keeper: callers of this member waiting for a token

    @property
    def held(self) -> int:
        return self.taken + self.got - self.given - self.returned


class _Budget:
    """One budget's tokens, its cap and its members."""

    __slots__ = ("cap_box", "debt", "free", "members")

    def __init__(self, cap: int) -> None:
        self.free: queue.SimpleQueue[object] = queue.SimpleQueue()
        for _ in range(cap):
            self.free.put(_TOKEN)
        self.cap_box = [cap]  # popped by the one thread that resizes, then put back
        self.debt: deque[None] = deque()  # tokens to drop when given back (cap shrank)
        self.members: dict[str, _Member] = {}

    def put(self, count: int) -> None:
        for _ in range(count):
            try:
                self.debt.pop()
            except IndexError:
                self.free.put(_TOKEN)

    def resize(self, cap: int) -> None:
        """Make the token count follow a changed cap (rare: a spec re-registered)."""
        try:
            old = self.cap_box.pop()
        except IndexError:
            return  # another thread resizes right now; the next take tries again
        try:
            self.put(max(0, cap - old))
            for _ in range(max(0, old - cap)):
                try:
                    self.free.get_nowait()
                except queue.Empty:
                    self.debt.append(None)
        finally:
            self.cap_box.append(cap)


_budgets: dict[tuple[str, str], _Budget] = {}


def _forget_after_fork() -> None:
    _budgets.clear()  # the parent's tokens mean nothing in a child


os.register_at_fork(after_in_child=_forget_after_fork)


class LedgerView(NamedTuple):
    """A budget as one member sees it."""

    shares: Renewal
    """Members holding or waiting, and our rank: :meth:`Renewal.share` is our fair share."""
    callers_waiting: int
    """Callers of the other members waiting for a token."""


class LocalLedger:
    """One keeper's handle on the process's embedded budgets (namespace ``prefix``).

    The embedded twin of :class:`enginehouse.fleet.LeaseStore`: the keeper calls
    :meth:`take`, :meth:`give`, :meth:`leave` and :meth:`view`; its
    LeaseWaiter calls :meth:`wait` and :meth:`untake`.
    """

    outage_errors: tuple[type[BaseException], ...] = ()
    """Nothing here can be unreachable (LeaseWaiter's contract)."""

    def __init__(
        self,
        prefix: str,
        member: str,
        keeper: pykka.ActorRef[Any],
        holdings: Holdings | None = None,
    ) -> None:
        self._prefix = prefix
        self._member = member
        self._keeper = keeper
        self._holdings = holdings

    def _budget(self, key: str, cap: int | None = None) -> _Budget:
        budget = _budgets.get((self._prefix, key))
        if budget is None:
            budget = _budgets.setdefault((self._prefix, key), _Budget(cap or 1))
        if cap is not None and budget.cap_box and budget.cap_box[-1] != cap:
            budget.resize(cap)
        return budget

    def _me(self, budget: _Budget) -> _Member:
        member = budget.members.get(self._member)
        if member is None:
            member = budget.members[self._member] = _Member(self._keeper, self._holdings)
        elif member.keeper is not self._keeper:
            member.keeper = self._keeper  # we restarted: the member (and its tokens) is ours
        return member

    def adopt(self, key: str, cap: int, held: int) -> None:
        """A restarted keeper takes over our member: it holds ``held`` tokens (keeper thread).

        Tokens the member counted beyond that (their Release died with the
        crashed keeper) go back; tokens it lacks are taken while free.
        """
        budget = self._budget(key, cap)
        member = self._me(budget)
        surplus = member.held - held
        if surplus > 0:
            self.give(key, surplus)
        for _ in range(-surplus):
            try:
                budget.free.get_nowait()
            except queue.Empty:
                break
            member.taken += 1

    def take(self, key: str, cap: int, waiting: int = 1) -> bool:
        """A token if one is free (never blocks); refused, ``waiting`` callers of ours wait."""
        budget = self._budget(key, cap)
        member = self._me(budget)
        # A token given back while another manager waits is that manager's: its waiter
        # may not have woken yet (a queue, unlike Redis, does not hand it over at once).
        queued = any(m.waiting for n, m in list(budget.members.items()) if n != self._member)
        try:
            if queued:
                raise queue.Empty
            budget.free.get_nowait()
        except queue.Empty:
            if self._reap(key, budget):
                return self.take(key, cap, waiting)
            member.waiting = waiting
            return False
        member.taken += 1
        return True

    def channel(self) -> LocalLedger:
        """What a LeaseWaiter waits through: the ledger itself (nothing to open)."""
        return self

    def close(self) -> None:
        """Nothing to close (LeaseWaiter's contract)."""

    def wait(self, key: str, block: float) -> bool:
        """Block up to ``block`` s for the next token given back (LeaseWaiter thread)."""
        budget = self._budget(key)
        try:
            budget.free.get(timeout=block)
        except queue.Empty:
            return False
        member = budget.members.get(self._member)
        if member is None:  # our keeper has left: the token is not ours to keep
            budget.put(1)
            return False
        member.got += 1
        return True

    def untake(self, key: str) -> None:
        """Put back a token that reached a waiter after its keeper stopped (waiter thread).

        If the keeper left meanwhile, :meth:`leave` already gave it back with
        the rest (``got`` counted it).
        """
        budget = self._budget(key)
        member = budget.members.get(self._member)
        if member is not None:
            member.returned += 1
            budget.put(1)

    def give(self, key: str, count: int = 1) -> None:
        """Give ``count`` tokens back; the longest-blocked waiter of any manager gets the first."""
        budget = self._budget(key)
        self._me(budget).given += count
        budget.put(count)

    def free_count(self, key: str, cap: int) -> int:
        """Tokens free now (approximate: other keepers take and give meanwhile)."""
        return self._budget(key, cap).free.qsize()

    def set_waiting(self, key: str, waiting: int) -> None:
        """How many callers of ours wait for a token now (0: none)."""
        self._me(self._budget(key)).waiting = waiting

    def leave(self, key: str) -> None:
        """Give back every token of ours and forget us (the keeper stops)."""
        budget = self._budget(key)
        member = budget.members.pop(self._member, None)
        if member is not None:
            budget.put(max(0, member.held))

    def view(self, key: str) -> LedgerView:
        """Who holds and who waits: the basis of each member's fair share."""
        budget = self._budget(key)
        self._reap(key, budget)
        members = dict(budget.members)  # a copy: other keepers add entries meanwhile
        active = sorted(m for m, s in members.items() if s.held > 0 or s.waiting)
        rank = active.index(self._member) if self._member in active else len(active)
        others = [s for m, s in members.items() if s.waiting and m != self._member]
        shares = Renewal(
            held=sum(max(0, s.held) for s in members.values()),
            others_waiting=len(others),
            processes=len(active),
            rank=rank,
            lost=0,
        )
        return LedgerView(shares, sum(s.waiting for s in others))

    def others(self, key: str) -> list[pykka.ActorRef[Any]]:
        """The keepers of the other live members of ``key``."""
        budget = self._budget(key)
        return [
            s.keeper for m, s in dict(budget.members).items()
            if m != self._member and s.keeper.is_alive()
        ]

    def _reap(self, key: str, budget: _Budget) -> bool:
        """Put back the tokens of members that are gone; True if any.

        Gone: the keeper died and its manager is gone too (collected), or
        holds no connection of this budget. A keeper that crashed while its
        connections live is not reaped: its restart adopts their tokens
        (:class:`Holdings`), and reaping them would let the cap be exceeded.
        """
        reaped = False
        for name, member in list(budget.members.items()):
            if name != self._member and self._gone(member, key):
                gone = budget.members.pop(name, None)  # one thread wins the pop
                if gone is not None and gone.held > 0:
                    budget.put(gone.held)
                    reaped = True
        return reaped

    def _gone(self, member: _Member, key: str) -> bool:
        if member.keeper.is_alive():
            return False
        holdings = member.holdings()
        if holdings is None:
            return True
        return holdings.count(key) == 0

