"""The LeaseWaiter actor: blocks for one budget's next free permit.

A keeper must keep answering its mailbox, so it never blocks on a permit
itself. When its budget is full (across the fleet in Redis, or across the
process's managers in the embedded ledger), it tells this actor
:class:`StartWaiting`; the actor then blocks (``BLMOVE`` in Redis, a queue ``get``
embedded; at most ``block`` seconds at a time) until a permit given back
anywhere becomes this keeper's, and tells the keeper :class:`WaitEnded`. Each
StartWaiting asks for one permit: the waiter blocks until it caught as many as
it was asked for (the keeper asks again after handing one on), or until
:class:`StopWaiting`. A waiter that kept catching permits before its
keeper had read the first (a busy keeper, a loaded machine) left more
permits on their way than the keeper's renewal allowed for; the renewal
took one back from Redis while its connection opened, and the fleet went
one over the cap (measured: 7 connections under a cap of 6,
``tests/test_fleet_redis.py``). There is no polling: a freed permit reaches
the longest waiter at once (in Redis, in one round trip).

Redis answering the wait with an error (``OOM``, ``READONLY``, ``WRONGTYPE``)
is reported, not raised: the keeper fails its callers with our error. If the
waiter crashes all the same, it tells the keeper, which starts another one
when it next needs to wait: no dead reference is kept.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Protocol

import pykka

from enginehouse import fleet
from enginehouse.messages.budget import StartWaiting, StopWaiting, WaitEnded

log = logging.getLogger("enginehouse.budget")


class Channel(Protocol):
    """What a waiter blocks on: a Redis client of its own (:class:`enginehouse.fleet.WaitChannel`)
    or the process's embedded ledger (:class:`enginehouse.ledger.LocalLedger`). The waiter
    closes it when it stops."""

    outage_errors: tuple[type[BaseException], ...]

    def wait(self, key: str, block: float) -> bool: ...

    def untake(self, key: str) -> None: ...

    def close(self) -> None: ...


class _Block:
    """Self-tell: one more blocking wait (messages sent meanwhile are read first)."""


class LeaseWaiter(pykka.ThreadingActor):
    """Blocks in Redis for permits of budget ``key``; see the module docstring."""

    use_daemon_thread = True

    def __init__(
        self,
        keeper: pykka.ActorRef[Any],
        channel: Channel,
        key: str,
        *,
        block: float = fleet.WAIT_BLOCK,
    ) -> None:
        super().__init__()
        self._keeper = keeper
        self._channel = channel
        self._key = key
        self._block = block
        self._outage = channel.outage_errors
        self._wanted = 0  # permits asked for (StartWaitings) and not caught yet
        self._armed = False  # a _Block is in our mailbox: StartWaiting must not queue a second one

    def on_stop(self) -> None:
        self._channel.close()

    def on_failure(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._channel.close()
        with contextlib.suppress(pykka.ActorDeadError):
            self._keeper.tell(WaitEnded(self._key, got=False, failed=True, answered=self._wanted))

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, StartWaiting):
            self._wanted += 1
            self._arm()
            return None
        if isinstance(message, StopWaiting):
            if self._wanted:  # (else our catches already answered every StartWaiting)
                asked, self._wanted = self._wanted, 0
                self._tell(WaitEnded(self._key, got=False, stopped=True, answered=asked))
            return None
        if isinstance(message, _Block):
            return self._wait()
        raise TypeError(f"unexpected message {type(message).__name__}")

    def _arm(self) -> None:
        if self._wanted and not self._armed:
            self._armed = True
            self.actor_ref.tell(_Block())

    def _wait(self) -> None:
        self._armed = False
        if not self._wanted:
            return
        try:
            got = self._channel.wait(self._key, self._block)
        except self._outage:
            asked, self._wanted = self._wanted, 0
            self._tell(WaitEnded(self._key, got=False, failed=True, answered=asked))
            return
        except Exception as exc:  # Redis answered with an error: our keeper's callers learn it
            asked, self._wanted = self._wanted, 0
            code = fleet.error_code(exc)
            self._tell(WaitEnded(self._key, got=False, failed=True, refused=code, answered=asked))
            return
        if got:
            self._wanted -= 1  # one permit per StartWaiting: the keeper asks for the next
        if not self._tell(WaitEnded(self._key, got=got, answered=int(got))) and got:
            # The keeper stopped while we waited: nobody will give this permit back.
            with contextlib.suppress(*self._outage):
                self._channel.untake(self._key)
        self._arm()

    def _tell(self, message: WaitEnded) -> bool:
        try:
            self._keeper.tell(message)
        except pykka.ActorDeadError:
            self._wanted = 0
            self.stop()  # no keeper to wait for any more
            return False
        return True
