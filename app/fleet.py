"""Fleet leases in Redis: one atomic Lua script per acquire, release or renewal.

Per budget three keys share one hash tag (Redis Cluster keeps them together):

- ``leases``: sorted set of lease ids scored by expiry (Redis server time, so
  hosts need not agree on the clock). Acquire drops expired ids, checks
  ``ZCARD < cap`` and adds its id; a process killed with SIGKILL stops
  renewing, and its leases vanish after the TTL.
- ``queue``: waiting tickets scored by arrival (each process keeps only its
  oldest waiter in it); a freed permit goes to the waiting process that holds
  the fewest leases, then to the oldest ticket.
- ``qdl``: the same tickets scored by deadline, so a dead waiter's ticket goes.

Lease ids and tickets are ``<process>|<n>``: the renewal script counts the
processes that hold or want the budget, from which each derives its fair share.
Only the BudgetKeeper actor calls this module (the client is not shared).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from app.errors import ConfigurationError

_CLEAN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, tk in ipairs(gone) do redis.call('ZREM', KEYS[2], tk) end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
"""

_KEEP = """
local keep = math.ceil(tonumber(ARGV[2]) * 4000)
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], keep) end
"""

# ARGV: cap, ttl, lease id, ticket, ticket ttl -> {granted, held, queued}
# Who goes first when a permit frees: the waiting process holding the fewest
# leases, then the oldest ticket; so the fleet converges on even shares.
ACQUIRE = (
    _CLEAN
    + """
local function owner(m) return string.match(m, '^(.*)|') or m end
local cap = tonumber(ARGV[1])
local held = redis.call('ZCARD', KEYS[1])
local counts = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local p = owner(m)
  counts[p] = (counts[p] or 0) + 1
end
local me = owner(ARGV[4])
local mine = counts[me] or 0
local since = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[4]) or now)
local rank = redis.call('ZRANK', KEYS[2], ARGV[4])
local queue = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local ahead = 0
for i = 1, #queue, 2 do
  local p = owner(queue[i])
  if p ~= me then
    local c = counts[p] or 0
    if c < mine or (c == mine and tonumber(queue[i + 1]) < since) then ahead = ahead + 1 end
  end
end
local granted = 0
if cap - held > ahead then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[4])
  redis.call('ZREM', KEYS[3], ARGV[4])
  held = held + 1
  granted = 1
else
  if not rank then redis.call('ZADD', KEYS[2], now, ARGV[4]) end
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[4])
end
"""
    + _KEEP
    + """
return {granted, held, redis.call('ZCARD', KEYS[2])}
"""
)

# ARGV: lease ids -> {held, queued}
RELEASE = """
for i = 1, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])}
"""

# ARGV: ticket -> 1 when removed
WITHDRAW = """
redis.call('ZREM', KEYS[3], ARGV[1])
return redis.call('ZREM', KEYS[2], ARGV[1])
"""

# ARGV: cap, ttl, process, lease ids...
#   -> {held, others waiting, processes, our rank among them, lost ids...}
# A lease missing (expired, or Redis restarted empty) is added back while there
# is room; one that no longer fits is reported lost and its connection is shed.
RENEW = (
    _CLEAN
    + """
local cap = tonumber(ARGV[1])
local exp = now + tonumber(ARGV[2])
local lost = {}
for i = 4, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], exp, ARGV[i])
  elseif redis.call('ZCARD', KEYS[1]) < cap then
    redis.call('ZADD', KEYS[1], exp, ARGV[i])
  else
    table.insert(lost, ARGV[i])
  end
end
local seen, names, others = {}, {}, 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local p = string.match(m, '^(.*)|') or m
  if not seen[p] then seen[p] = true; table.insert(names, p) end
end
for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local p = string.match(m, '^(.*)|') or m
  if p ~= ARGV[3] then others = others + 1 end
  if not seen[p] then seen[p] = true; table.insert(names, p) end
end
table.sort(names)
local rank = #names
for i, p in ipairs(names) do if p == ARGV[3] then rank = i - 1 end end
"""
    + _KEEP
    + """
local out = {redis.call('ZCARD', KEYS[1]), others, #names, rank}
for _, id in ipairs(lost) do table.insert(out, id) end
return out
"""
)


@dataclass(frozen=True)
class Renewal:
    """What a renewal learned about one budget across the fleet."""

    held: int
    others_waiting: int
    processes: int
    rank: int
    """Our place among the processes (sorted ids): the first ``cap % processes`` get one more."""
    lost: tuple[str, ...]

    def share(self, cap: int) -> int:
        """Our fair share of ``cap`` (at least 1)."""
        if self.processes <= 0:
            return cap
        base, extra = divmod(cap, self.processes)
        return max(1, base + (1 if self.rank < extra else 0))


def check_url(url: str) -> str:
    """Refuse a malformed fleet URL without echoing it (it may hold a password)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("not a valid URL (redis://host:port/db)") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"scheme must be redis, rediss or unix, not {parts.scheme!r}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("names no host (redis://host:port/db)")
    if port == 0:
        raise ValueError("port must be 1-65535")
    return url


def describe(url: str) -> str:
    """``host:port`` of the fleet URL, safe to log (no user, no password)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    return f"{parts.hostname}:{parts.port or 6379}"


class LeaseStore:
    """Redis client and scripts for fleet leases (used from one actor thread only)."""

    def __init__(self, url: str, *, prefix: str, timeout: float) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.where = describe(url)
        self._prefix = prefix
        # No retries inside redis-py: the keeper decides what an outage means.
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._acquire = self._client.register_script(ACQUIRE)
        self._release = self._client.register_script(RELEASE)
        self._withdraw = self._client.register_script(WITHDRAW)
        self._renew = self._client.register_script(RENEW)
        self.round_trips = 0

    def keys(self, budget: str) -> list[str]:
        tag = f"{self._prefix}:{{{budget}}}"
        return [f"{tag}:leases", f"{tag}:queue", f"{tag}:qdl"]

    def ping(self) -> None:
        self.round_trips += 1
        self._client.ping()

    def acquire(
        self, budget: str, cap: int, ttl: float, lease_id: str, ticket: str, ticket_ttl: float
    ) -> tuple[bool, int, int]:
        """One round trip: ``(granted, leases held fleet-wide, tickets queued)``."""
        self.round_trips += 1
        granted, held, queued = self._acquire(
            keys=self.keys(budget), args=[cap, ttl, lease_id, ticket, ticket_ttl]
        )
        return bool(granted), int(held), int(queued)

    def release(self, budget: str, lease_ids: list[str]) -> tuple[int, int]:
        self.round_trips += 1
        held, queued = self._release(keys=self.keys(budget), args=lease_ids)
        return int(held), int(queued)

    def withdraw(self, budget: str, ticket: str) -> None:
        self.round_trips += 1
        self._withdraw(keys=self.keys(budget), args=[ticket])

    def renew(
        self, budget: str, cap: int, ttl: float, process: str, lease_ids: list[str]
    ) -> Renewal:
        self.round_trips += 1
        out: list[Any] = self._renew(
            keys=self.keys(budget), args=[cap, ttl, process, *lease_ids]
        )
        lost = tuple(item.decode() if isinstance(item, bytes) else str(item) for item in out[4:])
        return Renewal(int(out[0]), int(out[1]), int(out[2]), int(out[3]), lost)

    def close(self) -> None:
        self._client.close()


def outage_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "Redis is not answering" (not a bug of ours)."""
    import redis

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def check_reachable(url: str, prefix: str, timeout: float) -> None:
    """Raise :class:`ConfigurationError` naming ``fleet_url`` if Redis does not answer."""
    store = LeaseStore(url, prefix=prefix, timeout=timeout)
    try:
        store.ping()
    except outage_errors() as exc:
        raise ConfigurationError(
            "fleet_url", f"cannot reach Redis at {store.where} ({type(exc).__name__})"
        ) from None
    except Exception as exc:  # auth refused, not Redis...
        raise ConfigurationError(
            "fleet_url", f"Redis at {store.where} refused us ({type(exc).__name__})"
        ) from None
    finally:
        store.close()


def process_id() -> str:
    """A fresh id for this process's leases (new in each forked child)."""
    import os
    import secrets

    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
