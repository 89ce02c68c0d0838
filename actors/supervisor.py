"""The Supervisor actor: starts children, restarts crashed ones under their policy.

Children report a crash from ``on_failure`` with :class:`ChildExited`. A caller
that found a child dead asks :class:`WhereIs`, which also notices deaths that
were never reported (a failing ``on_start``). Either way the child is
restarted once per death: the supervisor compares actor URNs. After the
policy gives up, :class:`WhereIs` answers with ``ActorUnavailableError``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka

from enginehouse.actors.policy import RestartLedger, RestartPolicy
from enginehouse.errors import ActorUnavailableError
from enginehouse.messages.supervision import (
    ChildExited,
    ChildStatus,
    Deliver,
    GetSupervisionStats,
    StopChildren,
    SupervisionStats,
    WhereIs,
)

log = logging.getLogger("enginehouse.supervisor")

ChildFactory = Callable[[pykka.ActorRef[Any]], pykka.ActorRef[Any]]
"""Starts a child, given the supervisor's ref to report crashes to."""


@dataclass(frozen=True)
class ChildSpec:
    """How to (re)start one child."""

    name: str
    start: ChildFactory
    policy: RestartPolicy


def report_crash(
    supervisor: pykka.ActorRef[Any] | None, name: str, urn: str, exc: BaseException
) -> None:
    """From a child's ``on_failure``: tell its supervisor (if any) that it crashed."""
    if supervisor is not None:
        supervisor.tell(ChildExited(name, urn, f"{type(exc).__name__}: {exc}"))


class _Child:
    def __init__(self, spec: ChildSpec, ref: pykka.ActorRef[Any]) -> None:
        self.spec = spec
        self.ref = ref
        self.ledger = RestartLedger(spec.policy)
        self.gave_up: str | None = None


class Supervisor(pykka.ThreadingActor):
    """One-for-one supervisor of named children."""

    use_daemon_thread = True

    def __init__(self, children: list[ChildSpec]) -> None:
        super().__init__()
        self._specs = children
        self._children: dict[str, _Child] = {}
        self._stopping = False

    def on_start(self) -> None:
        for spec in self._specs:
            self._children[spec.name] = _Child(spec, spec.start(self.actor_ref))
            log.info("started %s", spec.name)

    def on_stop(self) -> None:
        self._stop_orphans()

    def on_failure(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # As in OTP, children die with their supervisor: nobody would restart or stop them.
        log.error("supervisor crashed (%s: %s); stopping its children", exc_type.__name__, exc)
        self._stop_orphans()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, WhereIs):
            return self._where_is(message.name)
        if isinstance(message, ChildExited):
            return self._exited(message)
        if isinstance(message, Deliver):
            return self._forward(message)
        if isinstance(message, GetSupervisionStats):
            return self._stats()
        if isinstance(message, StopChildren):
            return self._stop_children(message.timeout)
        raise TypeError(f"unexpected message {type(message).__name__}")

    def _where_is(self, name: str) -> pykka.ActorRef[Any]:
        child = self._children.get(name)
        if child is None:
            raise ActorUnavailableError(f"no actor named {name!r}")
        if not child.ref.is_alive():
            self._restart(child, reason="found dead")
        if child.gave_up is not None:
            raise ActorUnavailableError(f"{name} is down: {child.gave_up}")
        return child.ref

    def _forward(self, message: Deliver) -> None:
        try:
            self._where_is(message.name).tell(message.message)
        except (ActorUnavailableError, pykka.ActorDeadError) as exc:
            log.warning("could not forward %s to %s: %s",
                        type(message.message).__name__, message.name, exc)

    def _exited(self, message: ChildExited) -> None:
        child = self._children.get(message.name)
        if child is None or child.ref.actor_urn != message.urn:
            return  # already restarted by a WhereIs
        self._restart(child, reason=message.reason)

    def _restart(self, child: _Child, reason: str) -> None:
        if self._stopping or child.gave_up is not None:
            return
        if not child.spec.policy.should_restart(crashed=True):
            child.gave_up = f"crashed ({reason}); restart type is temporary"
            return
        delay = child.ledger.next_delay()
        if delay is None:
            policy = child.spec.policy
            child.gave_up = (
                f"crashed more than {policy.max_restarts} times within {policy.period:g}s, "
                f"last: {reason}"
            )
            log.error("giving up on %s: %s", child.spec.name, child.gave_up)
            return
        log.warning("restarting %s in %.3fs after: %s", child.spec.name, delay, reason)
        # Backoff blocks only the supervisor; callers wait within their ask timeout.
        time.sleep(delay)
        child.ref = child.spec.start(self.actor_ref)

    def _stats(self) -> SupervisionStats:
        return SupervisionStats(
            tuple(
                ChildStatus(name, child.ref.is_alive(), child.ledger.restarts, child.gave_up)
                for name, child in self._children.items()
            )
        )

    def _stop_orphans(self) -> None:
        """Tell every child still alive to stop (without waiting: we are going away)."""
        self._stopping = True
        for child in self._children.values():
            if child.ref.is_alive():
                with contextlib.suppress(pykka.ActorDeadError):
                    child.ref.stop(block=False)

    def _stop_children(self, timeout: float) -> None:
        """Stop children last started first, all within ``timeout``, then stop this actor.

        One deadline for all of them: a stuck child costs what is left of it,
        and the rest still get their stop (queued behind whatever the stuck one
        does, so its thread ends when that ends). This actor stops after
        answering, so a caller whose own wait ran out leaves no thread either.
        """
        self._stopping = True
        deadline = time.monotonic() + timeout
        for child in reversed(list(self._children.values())):
            if not child.ref.is_alive():
                continue
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0:
                    child.ref.stop(block=True, timeout=remaining)
                else:
                    child.ref.stop(block=False)
            except (pykka.ActorDeadError, pykka.Timeout):
                log.warning("%s did not stop within %.1fs", child.spec.name, timeout)
        self.stop()
