"""The DemandListener actor: hears, through Redis, when a process starts or stops waiting.

Fair shares must follow demand, not the Janitor's period (30 s by default):
when a process of the fleet starts waiting for a budget, the processes above
their share should give connections back at their next check-in. The fleet's
scripts publish each change of a budget's waiting set
(:mod:`enginehouse.fleet`); this actor, one per keeper in fleet mode, blocks
on that subscription (its own Redis connection; at most ``block`` seconds at a
time) and tells its keeper :class:`DemandChanged` for each budget with news.
News that arrives together is told once per budget. No polling: a blocked
``get_message`` costs nothing until Redis pushes.

Losing the subscription (Redis away) costs nothing but speed: the keeper's
renewals on the Janitor's rounds still reconcile the shares, and the
listener subscribes again on its next wait.

Shutdown does not wait out a blocked read: the keeper interrupts the channel
(its socket is shut down from the keeper's thread), and the listener stops
at once instead of after up to ``block`` seconds.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import pykka

from enginehouse import fleet
from enginehouse.messages.budget import DemandChanged

log = logging.getLogger("enginehouse.budget")


class Subscription(Protocol):
    """What the listener blocks on (:class:`enginehouse.fleet.DemandChannel`)."""

    outage_errors: tuple[type[BaseException], ...]
    interrupted: bool

    def news(self, block: float) -> list[tuple[str, str]]: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...

    def interrupt(self) -> None: ...


class _Listen:
    """Self-tell: one more blocking read (messages sent meanwhile are read first)."""


class DemandListener(pykka.ThreadingActor):
    """Tells ``keeper`` of demand news from Redis; see the module docstring."""

    use_daemon_thread = True

    def __init__(
        self,
        keeper: pykka.ActorRef[Any],
        channel: Subscription,
        me: str,
        *,
        block: float = fleet.DEMAND_BLOCK,
        retry: float = 1.0,
    ) -> None:
        super().__init__()
        self._keeper = keeper
        self._channel = channel
        self._me = me
        self._block = block
        self._retry = retry  # after Redis failed us: this long before subscribing again

    def on_start(self) -> None:
        self.actor_ref.tell(_Listen())

    def on_stop(self) -> None:
        self._channel.close()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _Listen):
            return self._listen()
        raise TypeError(f"unexpected message {type(message).__name__}")

    def _listen(self) -> None:
        try:
            news = self._channel.news(self._block)
        except Exception as exc:  # Redis away or refusing: renewals still keep shares right
            if self._channel.interrupted:  # shutdown woke us: the stop is next in our inbox
                return
            log.info("fleet: demand news interrupted (%s); listening again", type(exc).__name__)
            self._channel.reset()
            time.sleep(self._retry)  # Redis is away: a pause, not a tight reconnect loop
            news = []
        senders = {key: sender for key, sender in news if sender != self._me}
        for key, sender in senders.items():
            try:
                self._keeper.tell(DemandChanged(key, sender))
            except pykka.ActorDeadError:
                self.stop()
                return
        if not self._channel.interrupted:
            self.actor_ref.tell(_Listen())
