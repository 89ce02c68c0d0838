"""What ``EngineManager.stats()`` returns."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.settings import Mode
from messages.tunnel import TunnelStats


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


class ActorStats(BaseModel):
    """One supervised actor."""

    model_config = ConfigDict(frozen=True)

    name: str
    alive: bool
    restarts: int
    gave_up: str | None


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
