"""Conversation between the Supervisor and its children."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChildExited:
    """Tell (from a child's ``on_failure``): the child with ``urn`` crashed."""

    name: str
    urn: str
    reason: str


@dataclass(frozen=True)
class WhereIs:
    """Ask: the live ``ActorRef`` of child ``name``, restarting it first if it died."""

    name: str


@dataclass(frozen=True)
class Deliver:
    """Tell: pass ``message`` on to child ``name`` (restarting it if it died).

    Lets one child reach another without a blocking ask, so no two actors
    ever wait on each other.
    """

    name: str
    message: object


@dataclass(frozen=True)
class StopChildren:
    """Ask: stop every child, last started first, within ``timeout`` in all.

    The supervisor then stops itself.
    """

    timeout: float


@dataclass(frozen=True)
class GetSupervisionStats:
    """Ask: a :class:`SupervisionStats`."""


@dataclass(frozen=True)
class ChildStatus:
    name: str
    alive: bool
    restarts: int
    gave_up: str | None


@dataclass(frozen=True)
class SupervisionStats:
    children: tuple[ChildStatus, ...]

    @property
    def restarts(self) -> int:
        return sum(child.restarts for child in self.children)
