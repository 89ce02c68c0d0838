"""What ``EngineManager.stats()`` returns."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from enginehouse.messages.tunnel import TunnelStats
from enginehouse.settings import Mode


class EngineStats(BaseModel):
    """One cached engine and its pool (``None`` where the pool class has no such number)."""

    model_config = ConfigDict(frozen=True)

    database_id: int | str
    catalog: str | None
    schema_name: str | None
    user: str | None
    url: str
    pool_class: str
    size: int | None
    checked_in: int | None
    checked_out: int | None
    overflow: int | None
    hits: int
    idle_seconds: float
    max_connections: int | None = None
    """The most connections the pool may open (pool_size + max_overflow, within any cap)."""


class ActorStats(BaseModel):
    """One supervised actor."""

    model_config = ConfigDict(frozen=True)

    name: str
    alive: bool
    restarts: int
    gave_up: str | None


class LongHolderStats(BaseModel):
    """A connection checked out longer than ``leak_detection_threshold`` (see enginehouse.leaks)."""

    model_config = ConfigDict(frozen=True)

    database_id: int | str
    source: str | None
    age: float
    thread: str


class BudgetStats(BaseModel):
    """One connection budget (``db:<id>``) or tunnel budget (``ssh:<bastion>``).

    ``held``/``waiting`` count this process; ``fleet_*`` are what Redis said at
    the last renewal (``None`` when embedded).
    """

    model_config = ConfigDict(frozen=True)

    key: str
    cap: int
    mode: str
    held: int
    waiting: int
    granted: int
    timeouts: int
    shed: int
    fleet_held: int | None = None
    fleet_waiting: int | None = None
    fleet_processes: int | None = None
    round_trips: int = 0
    acquire_round_trips: int = 0
    release_round_trips: int = 0
    renew_round_trips: int = 0
    blocking_waits: int = 0
    empty_waits: int = 0
    refusals: int = 0
    handovers: int = 0
    demand_news: int = 0


class ManagerStats(BaseModel):
    """Counters since the manager started (or since the fork that made this process)."""

    model_config = ConfigDict(frozen=True)

    mode: Mode
    engine_count: int
    hits: int
    misses: int
    evictions: int
    disposals: int
    created: int
    uncached_created: int
    restarts: int
    engines: list[EngineStats]
    actors: list[ActorStats]
    tunnels: list[TunnelStats] = Field(default_factory=list)
    budgets: list[BudgetStats] = Field(default_factory=list)
    leaks: dict[str, int] = Field(default_factory=dict)
    """Suspected leaks reported so far, per database id (leak detection on)."""
    long_holders: list[LongHolderStats] = Field(default_factory=list)
    """Connections out longer than ``leak_detection_threshold`` now, oldest first."""
