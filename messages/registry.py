"""Conversation with the EngineRegistry actor.

Misses, disposals and sweeps travel as these messages; hits never do: they
read the registry's published snapshot (see :class:`CachedEngine`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy.engine import URL, Engine

from enginehouse.specs import masked_url

if TYPE_CHECKING:
    from enginehouse.specs import SSHTunnelSpec


class RequestKey(NamedTuple):
    """What a caller asks for; the hit path looks this up in the snapshot.

    ``user`` and ``source`` are ``None`` unless they can change the engine
    (impersonation, or a connection mutator that may read them).
    """

    database_id: int | str
    fingerprint: str
    catalog: str | None
    schema: str | None
    user: str | None
    source: str | None


@dataclass(frozen=True, repr=False)
class EnginePlan:
    """Everything needed to build one engine, computed in the caller's thread.

    ``engine_key`` digests the final URL and arguments, so two requests that
    lead to the same engine (say, two sources a mutator ignores) share it.
    The URL carries the password and secret query parameters: the repr masks them.
    """

    engine_key: str
    database_id: int | str
    fingerprint: str
    url: URL
    kwargs: Mapping[str, Any]
    catalog: str | None = None
    schema: str | None = None
    user: str | None = None
    tunnel: SSHTunnelSpec | None = None
    redact: tuple[str, ...] = ()
    """Texts from ``encrypted_extra`` to mask in any error about this plan."""
    max_connections: int | None = None
    """``extra["max_connections"]``: this database's connection budget (None: the default)."""
    connection_shares: Mapping[str, Any] | None = None
    """``extra["connection_shares"]`` as the pool's argument (enginehouse.shares), or None."""

    def __repr__(self) -> str:
        return (
            f"EnginePlan(database_id={self.database_id!r}, url={masked_url(self.url)!r}, "
            f"catalog={self.catalog!r}, schema={self.schema!r}, user={self.user!r})"
        )


@dataclass(eq=False, repr=False)
class CachedEngine:
    """One engine in the registry's published snapshot.

    The registry owns every field but ``last_used``, which the facade stamps
    on each hit and the pool's checkin listener on each return (a single
    attribute store: atomic, and a lost race only loses a few microseconds
    of recency). ``hits`` is an ``itertools.count`` so concurrent increments
    are never lost. ``in_use`` holds one key per checked-out connection (its
    pool record's id; set and popped whole, so idempotent) for pools that do
    not count their own checkouts: eviction spares an engine in use.
    ``retired`` is set when the registry lets the engine go: from then on
    each connection returned to it is closed, so none outlives the registry.
    """

    engine: Engine
    plan: EnginePlan
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    hits: itertools.count[int] = field(default_factory=itertools.count)
    in_use: dict[int, None] = field(default_factory=dict)
    retired: bool = False

    def __repr__(self) -> str:
        return f"CachedEngine({self.plan!r})"


@dataclass(frozen=True)
class GetEngine:
    """Ask: the cached engine for ``key``, built from ``plan`` on a miss."""

    key: RequestKey
    plan: EnginePlan


@dataclass(frozen=True)
class BuildUncached:
    """Ask (NEW mode): a new engine from ``plan``, not cached, tracked for shutdown."""

    plan: EnginePlan


@dataclass(frozen=True)
class DisposeDatabase:
    """Ask: dispose every engine of a database; answers how many."""

    database_id: int | str


@dataclass(frozen=True)
class DisposeAll:
    """Ask: dispose every engine (shutdown, or after a fork)."""


@dataclass(frozen=True)
class EngineDisposed:
    """Tell: someone called ``engine.dispose()``; forget that engine."""

    engine_key: str
    engine_id: int


@dataclass(frozen=True)
class Sweep:
    """Tell (from the Janitor): evict engines idle past ``idle_timeout``, then enforce LRU."""

    idle_timeout: float
    max_engines: int
    now: float


@dataclass(frozen=True)
class GetStats:
    """Ask: a :class:`RegistryStats`."""


@dataclass(frozen=True)
class PoolStatus:
    """One engine's pool, as SQLAlchemy reports it."""

    database_id: int | str
    catalog: str | None
    schema: str | None
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
    """The most connections this pool may open at once (None: unbounded, or per thread)."""


@dataclass(frozen=True)
class RegistryStats:
    """The registry's counters and pools."""

    engines: tuple[PoolStatus, ...]
    misses: int
    created: int
    evictions: int
    disposals: int
    uncached_created: int
