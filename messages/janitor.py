"""Conversation with the Janitor, the only timer in the system."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tick:
    """Tell: run one cleanup round now (the Janitor sends it to itself each interval)."""

    scheduled: bool = True
    """False for a round asked for out of schedule; it does not arm another timer."""


@dataclass(frozen=True)
class GetJanitorStats:
    """Ask: a :class:`JanitorStats`."""


@dataclass(frozen=True)
class JanitorStats:
    rounds: int
    last_round_at: float | None
