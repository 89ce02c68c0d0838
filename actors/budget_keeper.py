"""The BudgetKeeper actor: sole owner of connection and tunnel budgets.

A budget (``db:<DatabaseSpec.id>`` or ``ssh:<bastion>``) caps how many
physical connections (or SSH sessions) exist at once. The keeper counts the
permits it granted and keeps a FIFO of waiters, each a pykka future that the
caller waits on with its ``pool_timeout``; no lock is involved anywhere.

Embedded (no ``fleet_url``) the cap holds across every engine of the process,
whichever manager made it: the keepers of one process share permit tokens
through :mod:`enginehouse.ledger` and tell each other (:class:`RecomputeShare`) when a
caller starts or stops waiting, so each gives back what exceeds its share.
With ``fleet_url`` each permit is also a lease in Redis (:mod:`enginehouse.fleet`), so
the cap holds across processes and hosts; the keeper renews leases on the
Janitor's rounds, and learns there how many processes share the budget. When
the fleet is full, a :class:`~enginehouse.actors.lease_waiter.LeaseWaiter` blocks in Redis for
the budget's next free permit, so waiting costs no polling.

Giving back: a waiter that cannot be served makes the keeper shed idle pooled
connections of the same budget (closed in place, their permits freed), and
publish "shed tokens" on the :class:`~enginehouse.actors.pools.ShareBoard`: each token makes
one connection close on check-in instead of returning idle to its pool. A
process (or, embedded, a manager) sheds what it holds beyond its fair share
(cap / processes or managers) while others wait.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections import deque
from typing import Any

import pykka

from enginehouse import fleet, ledger
from enginehouse.actors.demand_listener import DemandListener
from enginehouse.actors.lease_waiter import Channel, LeaseWaiter
from enginehouse.actors.pools import ShareBoard, close_idle, limit_pool
from enginehouse.actors.supervisor import report_crash
from enginehouse.errors import FleetUnavailableError, ManagerShutDownError, PoolExhaustedError
from enginehouse.ledger import Holdings, LocalLedger
from enginehouse.messages.budget import (
    Acquire,
    Attach,
    BudgetStatus,
    Cancel,
    Claim,
    DemandChanged,
    GetBudgetStats,
    Lease,
    RecomputeShare,
    Release,
    Renew,
    StartWaiting,
    StopWaiting,
    WaitEnded,
)

log = logging.getLogger("enginehouse.budget")

_RETRY_DOWN = 0.5
"""Seconds between reconnect attempts while Redis is away."""
_LISTENER_STOP = 2.0
"""Seconds shutdown waits for the DemandListener to stop (interrupted, it takes milliseconds)."""
_PROBE_PAUSE = 1.0
"""Embedded: after the ledger refused us, this long before a pool may ask for more again."""


class _Waiter:
    """A caller waiting for a permit: it leaves at ``deadline``, taking ``claim`` first."""

    __slots__ = ("claim", "deadline", "reply", "ticket")

    def __init__(self, message: Acquire) -> None:
        self.ticket = message.ticket
        self.deadline = message.deadline
        self.reply: pykka.ThreadingFuture[Lease] = message.reply
        self.claim: Claim = message.claim

    def left(self, now: float) -> bool:
        """The caller gave up (or will, before any grant could reach it)."""
        return now > self.deadline or not self.claim.open


class _Budget:
    """One budget's permits, waiters and what the fleet last told us about it."""

    def __init__(self, key: str, cap: int) -> None:
        self.key = key
        self.cap = cap
        self.held: set[str] = set()
        self.lost: set[str] = set()  # permits Redis no longer vouches for: shed them
        self.orphans = 0  # permits released while Redis was away: give back on return
        self.waiters: deque[_Waiter] = deque()
        self.engines: list[tuple[weakref.ref[Any], int]] = []  # (engine, its own limit)
        self.target = cap  # our fair share: cap, or cap / processes while others wait
        self.closing = 0  # idle connections we closed whose release is still on its way
        self.owed = 0  # permits to give back to the fleet, set once per Janitor round
        self.lend = 0  # our connections to close for our own waiters while we are at our share
        self.refused = False  # Redis said "full" to our last acquire
        self.waiter: pykka.ActorRef[Any] | None = None  # our LeaseWaiter, once needed
        self.wanting = False  # the LeaseWaiter blocks in Redis for us
        # StartWaitings our LeaseWaiter has not answered yet: each may bring one permit that
        # is ours in Redis before we have heard of it (a renewal must not take it back).
        self.in_flight = 0
        self.announced = False  # Redis lists us as waiting (until a renewal says otherwise)
        self.others_waiting = 0  # embedded: callers of the process's other managers waiting
        self.probe_after = 0.0  # embedded: no pool grows past its permits before this
        self.granted = self.timeouts = self.shed = 0
        self.waits = self.handovers = 0  # blocking waits in Redis; permits passed on in-process
        self.demand_news = 0  # renewals made because another process started/stopped waiting
        self.stale = False  # fleet: refused just now; renew to learn our share
        self.empty_waits = self.refusals = 0  # waits that brought nothing; asks refused
        self.trips = {"acquire": 0, "release": 0, "renew": 0}  # Redis round trips by kind
        self.fleet_held: int | None = None
        self.fleet_waiting: int | None = None
        self.processes: int | None = None

    @property
    def excess(self) -> int:
        """Permits held beyond our fair share (0 unless other processes wait)."""
        return max(0, len(self.held) - len(self.lost) - self.target)


class BudgetKeeper(pykka.ThreadingActor):
    """Owns budgets; see the module docstring."""

    use_daemon_thread = True

    def __init__(
        self,
        board: ShareBoard,
        *,
        generation: int,
        holdings: Holdings | None = None,
        fleet_url: str | None = None,
        fleet_fallback: str = "closed",
        lease_ttl: float = 30.0,
        prefix: str = "enginehouse",
        redis_timeout: float = 1.0,
        supervisor: pykka.ActorRef[Any] | None = None,
        name: str = "budget",
    ) -> None:
        super().__init__()
        self._board = board
        self._generation = generation
        self._url = fleet_url
        self._fallback = fleet_fallback
        self._ttl = lease_ttl
        self._prefix = prefix
        self._redis_timeout = redis_timeout
        self._supervisor = supervisor
        self._name = name
        self._store: fleet.LeaseStore | None = None
        self._listener: pykka.ActorRef[Any] | None = None  # fleet: demand news from Redis
        self._news: fleet.DemandChannel | None = None  # its subscription (we interrupt it)
        self._ledger: LocalLedger | None = None  # embedded: the process's shared tokens
        self._outage: tuple[type[BaseException], ...] = ()
        self._slow: tuple[type[BaseException], ...] = ()
        self._refusal: tuple[type[BaseException], ...] = ()
        # The permits in use live outside us, under an identity that survives our restart.
        self._holdings = holdings if holdings is not None else Holdings(fleet.process_id())
        self._process = self._holdings.process
        self._budgets: dict[str, _Budget] = {}
        self._down_since: float | None = None
        self._last_ok = time.monotonic()
        self._next_reconnect = 0.0

    # -- lifecycle -------------------------------------------------------------

    def on_start(self) -> None:
        self._board.keeper = self.actor_ref  # before adopting: releases must reach us
        if self._url is not None:
            # Created here, in this process's keeper: never a client inherited over fork().
            self._store = fleet.LeaseStore(
                self._url, prefix=self._prefix, process=self._process, timeout=self._redis_timeout
            )
            self._outage = fleet.outage_errors()
            self._slow = fleet.slow_reply_errors()
            self._refusal = fleet.refusal_errors()
            self._news = self._store.demand_channel()
            self._listener = DemandListener.start(self.actor_ref, self._news, self._process)
        else:
            self._ledger = LocalLedger(self._prefix, self._process, self.actor_ref, self._holdings)
        self._board.shed.clear()
        self._board.limits.clear()
        self._adopt()

    def _adopt(self) -> None:
        """After a crash: the permits our connections still hold are ours again (see Holdings)."""
        for key, (cap, engines) in list(self._holdings.engines.items()):
            self._budget(key, cap).engines = [(r, n) for r, n in engines if r() is not None]
        for key, (cap, lease_ids) in self._holdings.by_budget().items():
            budget = self._budget(key, cap)
            budget.held.update(lease_ids)
            log.warning("budget %s: adopted %d permits held before a restart", key, len(lease_ids))
            if self._ledger is not None:
                self._ledger.adopt(key, cap, len(lease_ids))
                self._share_locally(budget)  # others may have started waiting meanwhile
            else:
                self._sync(budget)  # Redis: our taken list back to what we hold
            self._rebalance(budget)

    def on_stop(self) -> None:
        gone = ManagerShutDownError("the manager shut down while this caller waited")
        for budget in self._budgets.values():
            while budget.waiters:
                _fail(budget.waiters.popleft(), gone)
            if budget.waiter is not None:
                # It may sit in a blocking wait for up to WAIT_BLOCK; a permit it catches
                # meanwhile it puts back itself, on its own connection.
                with contextlib.suppress(pykka.ActorDeadError):
                    budget.waiter.tell(StopWaiting())
                    budget.waiter.stop(block=False)
            if self._store is not None and self._down_since is None and any(budget.trips.values()):
                self._call(self._store.leave, budget, "release", budget.cap, self._ttl)
            if self._ledger is not None:
                self._ledger.leave(budget.key)
                self._nudge(budget)
        self._stop_listener(wait=True)
        if self._store is not None:
            self._store.close()

    def _stop_listener(self, *, wait: bool = False) -> None:
        """Stop our DemandListener now (interrupting its blocked read); ``wait``: until it has."""
        if self._news is not None:
            self._news.interrupt()
        if self._listener is not None:
            with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                self._listener.stop(block=wait, timeout=_LISTENER_STOP if wait else None)

    def on_failure(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop_listener()  # the restarted keeper starts its own
        for budget in self._budgets.values():  # and its own LeaseWaiters: ours would idle forever
            if budget.waiter is not None:
                with contextlib.suppress(pykka.ActorDeadError):
                    budget.waiter.tell(StopWaiting())
                    budget.waiter.stop(block=False)
        report_crash(self._supervisor, self._name, self.actor_urn, exc)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Acquire):
            return self._acquire(message)
        if isinstance(message, Release):
            return self._release(message)
        if isinstance(message, WaitEnded):
            return self._waited(message)
        if isinstance(message, RecomputeShare):
            return self._squeezed(message)
        if isinstance(message, DemandChanged):
            return self._demand(message)
        if isinstance(message, Cancel):
            return self._cancel(message)
        if isinstance(message, Attach):
            return self._attach(message)
        if isinstance(message, Renew):
            return self._renew()
        if isinstance(message, GetBudgetStats):
            return tuple(self._status(b) for b in self._budgets.values())
        raise TypeError(f"unexpected message {type(message).__name__}")

    # -- handlers --------------------------------------------------------------

    def _acquire(self, message: Acquire) -> None:
        budget = self._budget(message.key, message.cap)
        waiter = _Waiter(message)
        if waiter.left(time.monotonic()):
            budget.timeouts += 1  # it gave up before we read its ask: nothing to grant
            return
        budget.waiters.append(waiter)
        self._serve(budget)
        if waiter in budget.waiters:
            self._rebalance(budget)

    def _release(self, message: Release) -> None:
        budget = self._budgets.get(message.key)
        if budget is None or message.lease_id not in budget.held:
            return  # a lease of an earlier keeper, or released twice
        budget.held.discard(message.lease_id)
        budget.closing = max(0, budget.closing - 1)
        owing = budget.owed > 0  # this permit is the one we owe: it must leave us
        budget.owed = max(0, budget.owed - 1)
        self._limit_pools(budget)
        if message.lease_id in budget.lost:
            budget.lost.discard(message.lease_id)  # Redis never had it (or dropped it)
        elif not owing and self._down_since is None and self._grant(budget, message.lease_id):
            # Handed to our own next waiter: no Redis round trip, no token moves.
            budget.lend = max(0, budget.lend - 1)
            budget.handovers += 1
            self._settle(budget)
            self._rebalance(budget)
            return
        else:
            self._give_back(budget, 1)
        self._serve(budget)
        self._rebalance(budget)

    def _cancel(self, message: Cancel) -> None:
        """The caller left (it holds the claim, so nothing can be granted to it): drop it now."""
        budget = self._budgets.get(message.key)
        if budget is not None:
            self._prune(budget)
            self._settle(budget)

    def _waited(self, message: WaitEnded) -> None:
        """Our LeaseWaiter's blocking wait in Redis ended: with a permit, empty, or failed."""
        budget = self._budgets.get(message.key)
        if budget is None:
            return
        budget.in_flight = max(0, budget.in_flight - message.answered)
        if message.stopped:
            return  # it read our StopWaiting before catching anything
        budget.trips["acquire"] += 1 if self._store is not None else 0
        budget.waits += 1
        if message.refused is not None:
            budget.wanting = False  # the LeaseWaiter stopped waiting
            self._fail_all(budget, self._refused(budget, "wait", message.refused))
            return
        if message.failed:
            budget.wanting = False  # the LeaseWaiter stopped waiting (or crashed)
            lost = ConnectionError("the blocking wait for a permit lost Redis")
            fleet_up = self._store is not None and self._down_since is None
            if fleet_up and not self._still_answers(lost):
                self._went_down(lost)
            self._serve(budget)  # waits again (Redis answers), or serves as the fallback says
            return
        if not message.got:
            budget.empty_waits += 1
            budget.refused = True  # nothing was free for a whole wait: the fleet is full
            self._settle(budget)
        else:
            # At our share while others wait, a permit our waiter caught is not ours to keep:
            # often it is the very one we gave back (our wait in Redis was the oldest), and
            # the process that waits for it would wait until our next renewal (seen: 20 s).
            over = self._at_share(budget)
            if over or not self._grant(budget, self._holdings.new_id()):
                self._give_back(budget, 1)  # (or: its caller gave up, or got one of ours)
            self._settle(budget)  # nobody waits any more: we stop waiting (it already has)
            if budget.wanting and over:
                self._serve(budget)  # our own connections serve our callers (see _try_take)
            elif budget.wanting:  # callers still wait: it caught the permit asked for, ask again
                self._want(budget)
        self._rebalance(budget)

    def _squeezed(self, message: RecomputeShare) -> None:
        budget = self._budgets.get(message.key)
        if budget is not None and self._ledger is not None:
            self._share_locally(budget)
            self._rebalance(budget)

    def _demand(self, message: DemandChanged) -> None:
        """Another process started or stopped waiting: renew now, give back beyond our share."""
        budget = self._budgets.get(message.key)
        if budget is None or self._store is None or self._down_since is not None:
            return
        if budget.held or budget.waiters or budget.announced:
            budget.demand_news += 1
            self._sync(budget)
            self._serve(budget)
            self._rebalance(budget)

    def _attach(self, message: Attach) -> None:
        budget = self._budget(message.key, message.cap)
        budget.engines = [(r, n) for r, n in budget.engines if r() is not None]
        budget.engines.append((message.engine, message.limit))
        self._holdings.attach(message.key, message.cap, message.engine, message.limit)
        self._limit_pools(budget)

    def _renew(self) -> None:
        now = time.monotonic()
        if self._store is not None:
            if self._down_since is not None:
                self._reconnect()
            if self._down_since is not None:
                self._while_down(now)
            else:
                self._follow_master()
                for budget in list(self._budgets.values()):
                    self._sync(budget)
        for budget in self._budgets.values():
            if self._ledger is not None:
                self._share_locally(budget)
            self._prune(budget)
            self._serve(budget)
            self._rebalance(budget)

    # -- granting --------------------------------------------------------------

    def _serve(self, budget: _Budget) -> None:
        """Grant permits to waiters in arrival order while there is room."""
        self._prune(budget)
        while budget.waiters:
            try:
                lease_id = self._try_take(budget)
            except (FleetUnavailableError, PoolExhaustedError) as exc:
                _fail(budget.waiters.popleft(), exc)
                continue
            if lease_id is None:
                break
            if not self._grant(budget, lease_id) and (self._store is None or not self._down_since):
                self._give_back(budget, 1)  # its caller left this very moment
        self._settle(budget)
        if budget.stale:
            budget.stale = False
            self._sync(budget)

    def _grant(self, budget: _Budget, lease_id: str) -> bool:
        """Give ``lease_id`` to the oldest waiter still waiting; False if none is left.

        The claim is taken first: a caller that left took it, and is skipped.
        """
        now = time.monotonic()
        while budget.waiters:
            waiter = budget.waiters.popleft()
            if waiter.left(now) or not waiter.claim.take():
                budget.timeouts += 1
                continue
            budget.held.add(lease_id)
            budget.granted += 1
            self._holdings.add(lease_id, budget.key, budget.cap)
            waiter.reply.set(Lease(budget.key, lease_id, self._generation))
            self._limit_pools(budget)
            return True
        return False

    def _prune(self, budget: _Budget) -> None:
        """Drop waiters whose caller left (its deadline passed, or it cancelled)."""
        now = time.monotonic()
        if any(w.left(now) for w in budget.waiters):
            live = [w for w in budget.waiters if not w.left(now)]
            budget.timeouts += len(budget.waiters) - len(live)
            budget.waiters = deque(live)

    def _fail_all(self, budget: _Budget, exc: BaseException) -> None:
        while budget.waiters:
            _fail(budget.waiters.popleft(), exc)
        self._settle(budget)

    def _refused(self, budget: _Budget, step: str, code: str) -> FleetUnavailableError:
        """Redis answered ``step`` with an error that is no outage (OOM, READONLY, ...)."""
        log.error("budget %s: Redis at %s refused the %s step (%s)", budget.key, self._where(),
                  step, code)
        return FleetUnavailableError(
            f"budget {budget.key}: Redis at {self._where()} refused the {step} step ({code})"
        )

    def _try_take(self, budget: _Budget) -> str | None:
        """A new lease id if the budget has room for one more, else None."""
        if len(budget.held) >= budget.cap:
            return None
        lease_id = self._holdings.new_id()
        if self._store is None:
            return self._take_local(budget, lease_id)
        if self._down_since is not None:
            self._reconnect()
        if self._down_since is None:
            if self._at_share(budget):
                # Others wait and we hold our share: waiting in Redis would race them for
                # the permits we give back. Our own connections serve our callers instead.
                self._stop_wanting(budget)
                budget.lend = len(budget.waiters)
                return None
            if budget.wanting and _alive(budget.waiter):
                return None  # our LeaseWaiter brings the next permit the fleet frees
            if budget.announced:
                # Redis lists us as waiting (the others know): a blocking wait takes a free
                # permit at once, or the next one freed; asking first would cost a round trip.
                self._want(budget)
                return None
            # Ask first: refused, the script lists us as waiting and tells the others at once.
            answer = self._call(self._store.take, budget, "acquire", budget.cap, self._ttl)
            if answer is not None:
                granted, budget.fleet_held, budget.fleet_waiting = answer
                budget.refused = not granted
                if granted:
                    return lease_id
                budget.refusals += 1
                budget.announced = True  # the script marked us as waiting
                budget.stale = True  # learn our share now: at it, our own connections serve us
                self._want(budget)
                return None
        return self._take_while_down(budget, lease_id)

    def _take_local(self, budget: _Budget, lease_id: str) -> str | None:
        """Embedded: a token from the process's ledger, or wait for one."""
        assert self._ledger is not None
        if budget.wanting and _alive(budget.waiter):
            return None  # our LeaseWaiter brings the next token any manager gives back
        if self._ledger.take(budget.key, budget.cap, len(budget.waiters)):
            budget.refused = False
            return lease_id
        budget.refused = True  # other managers of the process hold the rest
        budget.refusals += 1
        budget.probe_after = time.monotonic() + _PROBE_PAUSE
        self._want(budget)
        self._share_locally(budget)
        self._nudge(budget)
        return None

    def _want(self, budget: _Budget) -> None:
        """Have our LeaseWaiter block for the budget's next free permit."""
        if not _alive(budget.waiter):  # none yet, or it crashed: a new one
            channel: Channel
            if self._store is not None:
                channel, block = self._store.channel(), fleet.WAIT_BLOCK
            else:
                assert self._ledger is not None
                channel, block = self._ledger.channel(), ledger.WAIT_BLOCK
            budget.waiter = LeaseWaiter.start(self.actor_ref, channel, budget.key, block=block)
        assert budget.waiter is not None
        budget.wanting = True
        try:
            budget.waiter.tell(StartWaiting())
        except pykka.ActorDeadError:  # it died just now: the next need starts another
            budget.wanting = False
        else:
            budget.in_flight += 1

    def _at_share(self, budget: _Budget) -> bool:
        """Fleet: other processes wait and we hold our share (or more) already."""
        if self._store is None or not budget.fleet_waiting:
            return False
        return len(budget.held) - len(budget.lost) >= min(budget.cap, budget.target)

    def _stop_wanting(self, budget: _Budget) -> None:
        """Our LeaseWaiter stops after its current wait (a permit it catches comes back)."""
        if budget.wanting and budget.waiter is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                budget.waiter.tell(StopWaiting())
        budget.wanting = False

    def _settle(self, budget: _Budget) -> None:
        """Nobody waits any more: stop waiting (and, embedded, tell the other managers)."""
        if budget.wanting and self._ledger is not None:
            self._ledger.set_waiting(budget.key, len(budget.waiters))
        if budget.wanting and not budget.waiters and budget.waiter is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                budget.waiter.tell(StopWaiting())
            budget.wanting = False
            budget.refused = False
            # Fleet: Redis keeps listing us as waiting until our next renewal, so the others
            # stay at their shares meanwhile; saying "stopped" at once measured as churn (each
            # served waiter let the others grow, ask, be refused, and shrink again).
            if self._ledger is not None:
                self._share_locally(budget)
                self._nudge(budget)

    def _give_back(self, budget: _Budget, count: int) -> None:
        """Return ``count`` permits to the fleet or to the process's ledger."""
        if self._ledger is not None:
            self._ledger.give(budget.key, count)
        else:
            self._release_remote(budget, count)

    # -- sharing between the managers of one process (embedded) --------------

    def _nudge(self, budget: _Budget) -> None:
        """Our waiting started or ended: the other keepers recompute their share."""
        assert self._ledger is not None
        for keeper in self._ledger.others(budget.key):
            with contextlib.suppress(pykka.ActorDeadError):
                keeper.tell(RecomputeShare(budget.key))

    def _share_locally(self, budget: _Budget) -> None:
        """Embedded: our fair share of the process's cap while any manager waits.

        Over our share while another manager waits, we give back the excess
        (``owed``). At our share while a caller of ours waits, our own
        connections serve it (``_rebalance``): nobody else owes us one.
        """
        assert self._ledger is not None
        view = self._ledger.view(budget.key)
        others_waiting = view.shares.others_waiting
        contended = others_waiting > 0 or budget.wanting
        budget.target = view.shares.share(budget.cap) if contended else budget.cap
        budget.owed = budget.excess if others_waiting else 0
        budget.others_waiting = view.callers_waiting
        self._limit_pools(budget)

    def _take_while_down(self, budget: _Budget, lease_id: str) -> str | None:
        if self._fallback != "local":
            raise FleetUnavailableError(
                f"budget {budget.key}: Redis at {self._where()} is unreachable and "
                "fleet_fallback='closed' refuses new connections"
            )
        return lease_id if len(budget.held) < self._local_share(budget) else None

    def _local_share(self, budget: _Budget) -> int:
        """While Redis is away: our share of the cap, from the processes last seen."""
        return max(1, budget.cap // max(1, budget.processes or 1))

    # -- giving back -----------------------------------------------------------

    def _rebalance(self, budget: _Budget) -> None:
        """Close what must be given back: idle connections first, then shed tokens.

        Given back: permits our own waiters need when we are at our limit,
        permits beyond our fair share while other processes (or, embedded,
        other managers) wait, and permits Redis no longer vouches for.
        """
        idle = 0  # waiters that idle connections of ours may serve (never a token)
        if self._store is None:
            at_share = len(budget.held) >= min(budget.cap, budget.target)
            local = len(budget.waiters) if at_share else 0
            # Other managers hold the rest of the cap while a caller of ours waits; or
            # callers of other managers wait while connections of ours sit idle.
            if budget.waiters:
                idle = len(budget.waiters) if budget.refused else 0
            else:
                idle = budget.others_waiting
        elif self._down_since is not None:
            local = len(budget.waiters) if len(budget.held) >= self._local_share(budget) else 0
        else:
            local = min(budget.lend, len(budget.waiters))  # (callers that left need none)
            # The fleet is full and a caller waits while a connection of ours sits idle.
            # (Idle connections go to other processes through the fair shares, once per
            # round: closing them whenever others wait measured as churn, no gain.)
            idle = len(budget.waiters) if budget.refused else 0
        wanted = local + budget.owed + len(budget.lost) - budget.closing
        if max(wanted, idle - budget.closing) > 0:
            closed = close_idle(budget.engines, max(wanted, idle - budget.closing))
            budget.closing += closed
            budget.shed += closed
            wanted -= closed
        if wanted > 0:
            self._board.shed[budget.key] = iter(range(wanted))
        else:
            self._board.shed.pop(budget.key, None)

    # -- fleet -----------------------------------------------------------------

    def _sync(self, budget: _Budget) -> None:
        """Renew our leases of ``budget``, learn the fleet's state, rebalance."""
        assert self._store is not None
        if budget.orphans:
            orphans, budget.orphans = budget.orphans, 0
            self._release_remote(budget, orphans)
        if not budget.held and not budget.waiters and not budget.announced:
            return
        vouched = sorted(budget.held - budget.lost)
        # Permits on their way to us from the LeaseWaiter: Redis must keep them.
        renewal = self._call(
            self._store.renew, budget, "renew", budget.cap, self._ttl,
            len(vouched), bool(budget.waiters), budget.in_flight, _demand_of(budget.engines),
        )
        if renewal is None:
            return
        budget.announced = bool(budget.waiters)
        budget.fleet_held = renewal.held
        budget.fleet_waiting = renewal.others_waiting
        budget.processes = renewal.processes
        if renewal.lost:
            log.warning(
                "budget %s: %d leases no longer fit the fleet cap; shedding their connections",
                budget.key,
                renewal.lost,
            )
        budget.lost.update(vouched[: renewal.lost])
        # Contended (others wait, or we do while the fleet is full): each process its share,
        # by the weighted demand of the sources it serves (connection_shares), fleet-wide.
        contended = renewal.others_waiting > 0 or bool(budget.waiters)
        budget.target = renewal.share(budget.cap) if contended else budget.cap
        # Give back what we hold beyond our share once per round: between rounds
        # Redis still serves waiters in turn, so a process briefly over its share
        # costs a reconnect per round, never one per query.
        budget.owed = budget.excess
        # A waiter left over from a larger share, while we are at our share, would wait
        # for a permit nobody gives back: once per round it takes over one of ours.
        at_share = len(budget.held) - len(budget.lost) >= budget.target
        budget.lend = len(budget.waiters) if at_share and not budget.owed else 0
        self._limit_pools(budget)

    def _release_remote(self, budget: _Budget, count: int) -> None:
        """Give ``count`` permits back to the fleet (a blocked waiter anywhere gets them)."""
        assert self._store is not None
        if self._down_since is not None:
            budget.orphans += count
            return
        # An id of its own: asked again after a late reply (the script may have run),
        # the give frees nothing more (else a live connection's permit, one over the cap).
        once = self._holdings.new_id()
        answer = self._call(
            self._store.give, budget, "release", budget.cap, self._ttl, count, once
        )
        if answer is None:
            budget.orphans += count
        else:
            budget.fleet_held, budget.fleet_waiting = answer

    def _call(self, method: Any, budget: _Budget, kind: str, *args: Any) -> Any:
        """One Redis round trip of ``kind``; None (outage noted) when Redis is away.

        A call that fails while Redis still answers a ping (a late reply on a
        loaded machine, a dropped connection) is made once more before Redis
        counts as gone: failing closed stops every new connection of the
        process. Asking twice is safe: the next renewal reconciles a script
        that ran twice.
        """
        for last in (False, True):
            budget.trips[kind] += 1
            try:
                result = method(budget.key, *args)
            except self._outage as exc:
                if not last and self._still_answers(exc):
                    continue
                self._went_down(exc)
                return None
            except self._refusal as exc:
                # Redis answers, with an error (OOM, READONLY, ...): no outage, and no use asking
                # again. A caller waiting for this step gets our error; others retry next round.
                refused = self._refused(budget, kind, fleet.error_code(exc))
                if kind == "acquire":
                    raise refused from None
                return None
            self._last_ok = time.monotonic()
            if self._store is not None and self._store.take_stale() and kind != "renew":
                self.actor_ref.tell(Renew())  # Redis lost our leases: re-register them now
            return result
        return None  # not reached: the last attempt returns either way

    def _follow_master(self) -> None:
        """Sentinel: after a failover, stop talking to the old master (it may still answer)."""
        assert self._store is not None
        try:
            moved = self._store.follow_master()
        except self._outage:
            return  # no Sentinel answers: the calls themselves tell whether the master does
        if moved:
            log.warning("fleet: the Sentinels name a new master for %s; re-registering leases",
                        self._where())

    def _still_answers(self, exc: BaseException) -> bool:
        """After a failed call: does Redis answer a ping? (Then the failure was passing.)"""
        assert self._store is not None
        try:
            self._store.ping()
        except self._outage:
            return False
        late = "answered late" if isinstance(exc, self._slow) else "dropped a call"
        log.warning("fleet: Redis at %s %s (%s) but answers; asking again",
                    self._where(), late, type(exc).__name__)
        return True

    def _went_down(self, exc: BaseException) -> None:
        if self._down_since is not None:
            return
        for budget in self._budgets.values():
            budget.announced = False
            if budget.wanting and budget.waiter is not None:
                with contextlib.suppress(pykka.ActorDeadError):
                    budget.waiter.tell(StopWaiting())  # its connection fails too; we serve locally
            budget.wanting = False
        self._down_since = time.monotonic()
        self._next_reconnect = self._down_since + _RETRY_DOWN
        if self._fallback == "local":
            log.warning(
                "fleet: Redis at %s unreachable (%s); serving under a local share of each "
                "budget until it returns (fleet_fallback='local')",
                self._where(),
                type(exc).__name__,
            )
        else:
            log.error(
                "fleet: Redis at %s unreachable (%s); refusing new connections until it "
                "returns (fleet_fallback='closed')",
                self._where(),
                type(exc).__name__,
            )

    def _reconnect(self) -> None:
        now = time.monotonic()
        if self._store is None or now < self._next_reconnect:
            return
        self._next_reconnect = now + _RETRY_DOWN
        try:
            self._store.ping()
        except self._outage:
            return
        outage = now - (self._down_since or now)
        self._down_since = None
        self._last_ok = now
        log.warning("fleet: Redis at %s is back after %.1fs; reconciling leases",
                    self._where(), outage)
        for budget in list(self._budgets.values()):
            self._sync(budget)

    def _while_down(self, now: float) -> None:
        """Closed: once our leases have expired in Redis, stop using their connections."""
        if self._fallback == "local" or now - self._last_ok < self._ttl:
            return
        for budget in self._budgets.values():
            unvouched = budget.held - budget.lost
            if unvouched:
                budget.lost.update(unvouched)
                self._rebalance(budget)

    # -- helpers ---------------------------------------------------------------

    def _limit_pools(self, budget: _Budget) -> None:
        """Size each engine's pool so that threads queue in their pool, not here.

        In the fleet a pool may hold one connection more than we have
        permits, up to our fair share: so at most one thread per pool waits
        for Redis, and the others wait for a pooled connection, which costs
        no reconnect. Embedded, it may also take what the process's ledger
        has free at once; the one connection more ("a probe") pauses for
        ``_PROBE_PAUSE`` after a refusal, or two managers at their shares
        would trade connections back and forth.
        """
        target = min(budget.cap, budget.target)
        if self._store is not None:
            share = self._local_share(budget) if self._down_since else target
            target = min(share, len(budget.held) + 1)
        elif self._ledger is not None:
            probe = 1 if time.monotonic() >= budget.probe_after else 0
            room = self._ledger.free_count(budget.key, budget.cap)
            target = min(target, len(budget.held) + max(room, probe))
        self._board.limits[budget.key] = target
        for ref, limit in budget.engines:
            pool = getattr(ref(), "pool", None)
            if pool is not None:
                limit_pool(pool, min(limit, target))

    def _budget(self, key: str, cap: int) -> _Budget:
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = _Budget(key, cap)
        budget.cap = cap  # the latest spec wins
        return budget

    def _where(self) -> str:
        return self._store.where if self._store is not None else "-"

    def _status(self, budget: _Budget) -> BudgetStatus:
        if self._store is None:
            mode = "local"
        elif self._down_since is None:
            mode = "fleet"
        else:
            mode = "fleet-fallback" if self._fallback == "local" else "fleet-down"
        return BudgetStatus(
            key=budget.key,
            cap=budget.cap,
            mode=mode,
            held=len(budget.held),
            waiting=len(budget.waiters),
            granted=budget.granted,
            timeouts=budget.timeouts,
            shed=budget.shed,
            fleet_held=budget.fleet_held,
            fleet_waiting=budget.fleet_waiting,
            fleet_processes=budget.processes,
            round_trips=sum(budget.trips.values()),
            acquire_round_trips=budget.trips["acquire"],
            release_round_trips=budget.trips["release"],
            renew_round_trips=budget.trips["renew"],
            blocking_waits=budget.waits,
            empty_waits=budget.empty_waits,
            refusals=budget.refusals,
            handovers=budget.handovers,
            demand_news=budget.demand_news,
        )


def _demand_of(engines: list[tuple[weakref.ref[Any], int]]) -> dict[str, float]:
    """The request sources our pools of a budget serve now, and their weights.

    Read from each pool's FairQueue (from our thread: plain reads of its
    counters); empty when no pool has an active source (the fleet counts us
    as serving ``"*"``).
    """
    demand: dict[str, float] = {}
    for ref, _ in engines:
        fair = getattr(getattr(ref(), "pool", None), "fair", None)
        if fair is not None:
            for source, weight in fair.demand().items():
                demand[source] = max(weight, demand.get(source, 0.0))
    return demand


def _fail(waiter: _Waiter, exc: BaseException) -> None:
    if waiter.claim.take():  # else the caller left already
        waiter.reply.set_exception((type(exc), exc, None))


def _alive(ref: pykka.ActorRef[Any] | None) -> bool:
    return ref is not None and ref.is_alive()
