"""Fleet leases in Redis: a counting semaphore whose waiters block inside Redis.

Per budget, keys that share one hash tag (Redis Cluster keeps them together):

- ``free``: a list of permit tokens. Taking a permit moves one token into
  the process's own ``taken:<process>`` list, atomically: a script when the
  process asks first, ``BLMOVE`` when it waits. Redis serves clients blocked
  in ``BLMOVE`` first come, first served, so a permit freed anywhere in the
  fleet wakes the longest-waiting process with no polling, and one round trip
  brings the permit.
- ``taken:<process>``: the permits a process holds (its length is all that
  counts; the keeper knows which connection holds which).
- ``procs``: processes by expiry of their last renewal (Redis server time, so
  hosts need not agree on the clock). A process killed with SIGKILL stops
  renewing; the next script of any process deletes its ``taken`` list after
  the TTL, and its permits become free again (waking a blocked waiter).
- ``want``: processes that wait, by expiry: the others learn from it that
  they should give back what they hold beyond their fair share.
- ``demand``: a hash, per process, of the request sources it serves now
  (``connection_shares`` weights of its active sources, JSON; see
  :func:`weighted_shares`): when processes contend, each one's share of the
  cap follows the weighted demand of its sources, fleet-wide.
- ``epoch``: a hash naming this incarnation of the budget's state (``id``)
  and the end of its rejoin window (``until``). Redis replicates
  asynchronously: a failover may lose the latest writes, and a restart
  without persistence (or a failover to a replica that had nothing) loses the
  budget. A script that finds no epoch starts a new one; when its caller knew
  the old one (it may hold permits that Redis forgot), the new epoch opens a
  rejoin window of ``ttl / 2``: no new permit is minted until it ends, while
  holders re-register the permits of their live connections (``RENEW``), so
  permits nobody vouches for are not handed out twice. Every reply names the
  epoch: a process that sees it change re-registers at once.

Demand is signalled through Redis itself, never polled: a process that
starts waiting (a refused take) or stops (a renewal) is added to or removed
from ``want`` by a script, which also publishes the process id on the
channel named like the ``want`` key. Every process's DemandListener
(:mod:`enginehouse.actors.demand_listener`) subscribes to those channels,
so the holders recompute their fair share and give back their excess at
their connections' next check-in, within milliseconds, not at the
Janitor's next round.

Every script first reaps dead processes and then *fits* the free list to
``cap - permits taken``, so the token count heals itself after a Redis
restart (empty), a change of cap, or a process reaped while it still ran.
Only the BudgetKeeper actor and its LeaseWaiter actors call this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from enginehouse import fleet_clients
from enginehouse.errors import ConfigurationError

log = logging.getLogger("enginehouse.budget")

# KEYS: free, procs, want, my taken list, epoch, demand.
# ARGV: taken-key base, cap, ttl, me, ..., the epoch we know ('' if none), rejoin window (s)
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local base, cap, ttl, me = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local known, window = ARGV[#ARGV - 1], tonumber(ARGV[#ARGV])
local epoch = redis.call('HGET', KEYS[5], 'id')
local rejoin_until = tonumber(redis.call('HGET', KEYS[5], 'until') or '0')
if not epoch then
  -- The budget's state is new or lost: a caller that knew it may hold permits we forgot.
  epoch = t[1] .. '.' .. t[2]
  rejoin_until = 0
  if known ~= '' then rejoin_until = now + window end
  redis.call('HSET', KEYS[5], 'id', epoch, 'until', rejoin_until)
end
local rejoining = now < rejoin_until
for _, p in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('DEL', base .. p)
  redis.call('HDEL', KEYS[5], 'gave:' .. p)
  redis.call('ZREM', KEYS[2], p)
  redis.call('HDEL', KEYS[6], p)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local function taken()
  local n = 0
  for _, p in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    n = n + redis.call('LLEN', base .. p)
  end
  return n
end
local function fit()
  local want = cap - taken()
  local have = redis.call('LLEN', KEYS[1])
  if want <= 0 then
    redis.call('DEL', KEYS[1])
  elseif want < have then
    redis.call('LTRIM', KEYS[1], 0, want - 1)
  elseif not rejoining then
    -- (While holders rejoin, permits missing from every list may still be in use.)
    for _ = 1, want - have do redis.call('RPUSH', KEYS[1], 't') end
  end
end
local function others_waiting()
  local n = redis.call('ZCARD', KEYS[3])
  if redis.call('ZSCORE', KEYS[3], me) then n = n - 1 end
  return n
end
local function want(yes)
  -- Join or leave the waiting set; a change is news for the other processes.
  local changed
  if yes then
    changed = redis.call('ZADD', KEYS[3], now + ttl, me)
  else
    changed = redis.call('ZREM', KEYS[3], me)
  end
  if changed == 1 then redis.call('PUBLISH', KEYS[3], me) end
end
local function keep()
  local ms = math.ceil(ttl * 4000)
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ms) end
end
"""

# -> {granted, permits taken fleet-wide, other processes waiting, epoch}
TAKE = (
    _PRELUDE
    + """
redis.call('ZADD', KEYS[2], now + ttl, me)
fit()
local granted = 0
if redis.call('LMOVE', KEYS[1], KEYS[4], 'LEFT', 'RIGHT') then
  granted = 1
else
  want(true)
end
keep()
return {granted, taken(), others_waiting(), epoch}
"""
)

# ARGV[5]: how many, ARGV[6]: this give's id ('' for none)
#   -> {permits taken fleet-wide, other processes waiting, epoch}
# A give whose id is the last one we gave did run already: the keeper asked again after a
# late reply. Giving twice would free a permit a live connection holds (one over the cap).
GIVE = (
    _PRELUDE
    + """
local n = math.min(tonumber(ARGV[5]), redis.call('LLEN', KEYS[4]))
if ARGV[6] ~= '' then
  if redis.call('HGET', KEYS[5], 'gave:' .. me) == ARGV[6] then n = 0 end
  redis.call('HSET', KEYS[5], 'gave:' .. me, ARGV[6])
end
if n > 0 then
  redis.call('LPOP', KEYS[4], n)
  -- Rejoining, nothing is minted: the permit itself moves on (it was vouched for).
  if rejoining then for _ = 1, n do redis.call('RPUSH', KEYS[1], 't') end end
end
fit()
keep()
return {taken(), others_waiting(), epoch}
"""
)

# ARGV[5]: permits we hold, ARGV[6]: 1 if we wait, ARGV[7]: permits that may be on
# their way to us (a BLMOVE answered but not yet handed to the keeper), ARGV[8]: our
# demand (JSON: source -> weight, of the sources we serve now)
#   -> {taken fleet-wide, others waiting, processes, our rank among them, lost, epoch,
#       our weighted share of the cap (-1: we neither hold nor wait)}
# Permits missing from our list (a failover lost our writes, Redis restarted empty, or
# we were reaped while frozen) are taken back while free ones remain, or re-registered
# while the budget's state rejoins after a loss; those that no longer fit are lost.
RENEW = (
    _PRELUDE
    + """
local held, slack = tonumber(ARGV[5]), tonumber(ARGV[7])
redis.call('ZADD', KEYS[2], now + ttl, me)
want(tonumber(ARGV[6]) > 0)
if redis.call('HGET', KEYS[6], me) ~= ARGV[8] then
  redis.call('HSET', KEYS[6], me, ARGV[8])
  -- Our sources changed while someone waits: the weighted shares move, tell the others.
  if redis.call('ZCARD', KEYS[3]) > 0 then redis.call('PUBLISH', KEYS[3], me) end
end
local extra = redis.call('LLEN', KEYS[4]) - held - slack
if extra > 0 then redis.call('LPOP', KEYS[4], extra) end
fit()
local lost = 0
for _ = 1, held - redis.call('LLEN', KEYS[4]) do
  if rejoining and taken() < cap then
    redis.call('RPUSH', KEYS[4], 't')  -- re-registered: our connection still holds it
  elseif rejoining or not redis.call('LMOVE', KEYS[1], KEYS[4], 'LEFT', 'RIGHT') then
    lost = lost + 1
  end
end
local names, others, rank = {}, 0, -1
for _, p in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local waits = redis.call('ZSCORE', KEYS[3], p)
  if waits and p ~= me then others = others + 1 end
  if waits or redis.call('LLEN', base .. p) > 0 then table.insert(names, p) end
end
table.sort(names)
for i, p in ipairs(names) do if p == me then rank = i - 1 end end
local share = -1
if rank >= 0 then
  -- Each source's weight is split evenly among the processes serving it; a process's
  -- share of the cap is its sources' part of the total (largest remainder, ties in
  -- name order). A process that names no source counts as serving "*" (weight 1).
  local demands, serving = {}, {}
  for _, p in ipairs(names) do
    local ok, d = pcall(cjson.decode, redis.call('HGET', KEYS[6], p) or '')
    if not ok or type(d) ~= 'table' or next(d) == nil then d = {['*'] = 1} end
    demands[p] = d
    for s, _ in pairs(d) do serving[s] = (serving[s] or 0) + 1 end
  end
  local weight, total = {}, 0
  for _, p in ipairs(names) do
    local w = 0
    for s, ws in pairs(demands[p]) do w = w + (tonumber(ws) or 0) / serving[s] end
    weight[p] = w
    total = total + w
  end
  if total > 0 then
    local parts, rest, given = {}, {}, 0
    for i, p in ipairs(names) do
      local quota = cap * weight[p] / total
      parts[p] = math.floor(quota + 1e-9)
      given = given + parts[p]
      table.insert(rest, {quota - parts[p], i, p})
    end
    table.sort(rest, function(a, b)
      if math.abs(a[1] - b[1]) > 1e-9 then return a[1] > b[1] end
      return a[2] < b[2]
    end)
    for j = 1, math.min(#rest, cap - given) do parts[rest[j][3]] = parts[rest[j][3]] + 1 end
    share = parts[me]
  end
end
if rank < 0 then rank = #names end
keep()
return {taken(), others, #names, rank, lost, epoch, share}
"""
)

# Drop everything of ours (shutdown): our permits go back to the free list.
LEAVE = (
    _PRELUDE
    + """
redis.call('DEL', KEYS[4])
redis.call('HDEL', KEYS[5], 'gave:' .. me)
redis.call('ZREM', KEYS[2], me)
redis.call('HDEL', KEYS[6], me)
want(false)
fit()
return taken()
"""
)


@dataclass(frozen=True)
class Renewal:
    """What a renewal learned about one budget across the fleet."""

    held: int
    others_waiting: int
    """Other processes waiting for a permit of this budget."""
    processes: int
    rank: int
    """Our place among the processes (sorted ids): the first ``cap % processes`` get one more."""
    lost: int
    """Permits we hold that no longer fit the cap (their connections must close)."""
    weighted: int = -1
    """Our share of the cap by the weighted demand of our sources (-1: none computed)."""

    def share(self, cap: int) -> int:
        """Our fair share of ``cap`` (at least 1): by weighted demand, else cap / processes."""
        if self.weighted >= 0:
            return max(1, min(cap, self.weighted))
        if self.processes <= 0:
            return cap
        base, extra = divmod(cap, self.processes)
        return max(1, base + (1 if self.rank < extra else 0))


def check_url(url: str) -> str:
    """Refuse a malformed fleet URL without echoing it (it may hold a password).

    One server, Sentinel or Cluster: see :mod:`enginehouse.fleet_clients`.
    """
    fleet_clients.parse(url)
    return url


def describe(url: str) -> str:
    """Where the leases live (``host:port``, or the Sentinels or Cluster nodes), safe to log."""
    return fleet_clients.parse(url).where()


class LeaseStore:
    """Redis clients and scripts for one process's fleet leases.

    The scripts run on the keeper's thread only. Blocking waits run on
    LeaseWaiter threads, each through a :class:`WaitChannel` of its own.
    """

    def __init__(self, url: str, *, prefix: str, process: str, timeout: float) -> None:
        self.where = describe(url)
        self.process = process
        self.outage_errors = outage_errors()
        self._prefix = prefix
        self._timeout = timeout
        self._url = url
        self._epochs: dict[str, tuple[str, float]] = {}  # budget -> (epoch, when we saw it)
        self._stale = False  # an epoch changed under us: our leases must be re-registered
        self._client = _client(url, timeout)
        self._take = self._client.register_script(TAKE)
        self._give = self._client.register_script(GIVE)
        self._renew = self._client.register_script(RENEW)
        self._leave = self._client.register_script(LEAVE)

    def keys(self, budget: str) -> list[str]:
        """free, procs, want, our taken list, the epoch and demand (the scripts' KEYS).

        One hash tag (``{budget}``) for all of them: a Redis Cluster keeps a
        budget in one slot, so its scripts and blocking waits run on one node.
        """
        tag = f"{self._prefix}:{{{budget}}}"
        return [f"{tag}:free", f"{tag}:procs", f"{tag}:want", f"{tag}:taken:{self.process}",
                f"{tag}:epoch", f"{tag}:demand"]

    def _args(self, budget: str, cap: int, ttl: float, *more: object) -> list[object]:
        base = f"{self._prefix}:{{{budget}}}:taken:"
        return [base, cap, ttl, self.process, *more, self._known(budget, ttl), ttl / 2]

    def _known(self, budget: str, ttl: float) -> str:
        """The budget's epoch if we saw it within a lease's lifetime (we may hold permits)."""
        epoch, seen = self._epochs.get(budget, ("", 0.0))
        return epoch if time.monotonic() - seen < ttl else ""

    def _saw(self, budget: str, epoch: Any) -> None:
        """A reply named the budget's epoch: a new one means Redis lost what we told it."""
        epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        before = self._epochs.get(budget, ("", 0.0))[0]
        if before and before != epoch:
            self._stale = True
            log.warning("budget %s: Redis at %s lost its lease state (failover or restart); "
                        "re-registering our leases", budget, self.where)
        self._epochs[budget] = (epoch, time.monotonic())

    def take_stale(self) -> bool:
        """Whether a reply named a new epoch since we last asked (then renew every budget)."""
        stale, self._stale = self._stale, False
        return stale

    def follow_master(self) -> bool:
        """Sentinel: ask which server is master now; True when it changed (we moved)."""
        return fleet_clients.follow_master(self._client)

    def ping(self) -> None:
        self._client.ping()

    def take(self, budget: str, cap: int, ttl: float) -> tuple[bool, int, int]:
        """One round trip, never blocks: ``(granted, taken fleet-wide, other processes waiting)``.

        Refused, we are marked as waiting; :meth:`wait` then blocks for the next permit.
        """
        args = self._args(budget, cap, ttl)
        granted, held, waiting, epoch = self._take(keys=self.keys(budget), args=args)
        self._saw(budget, epoch)
        return bool(granted), int(held), int(waiting)

    def channel(self) -> WaitChannel:
        """A connection of its own for one LeaseWaiter's blocking waits."""
        # The socket waits longer than the block, with room for a loaded machine.
        return WaitChannel(self, _client(self._url, WAIT_BLOCK + 2 * self._timeout))

    def give(
        self, budget: str, cap: int, ttl: float, count: int, once: str = ""
    ) -> tuple[int, int]:
        """Give ``count`` permits back: ``(permits taken fleet-wide, other processes waiting)``.

        ``once``: an id of this give; the same give asked again (after a late reply,
        when the script may have run) then gives nothing more.
        """
        args = self._args(budget, cap, ttl, count, once)
        held, waiting, epoch = self._give(keys=self.keys(budget), args=args)
        self._saw(budget, epoch)
        return int(held), int(waiting)

    def renew(
        self,
        budget: str,
        cap: int,
        ttl: float,
        held: int,
        waiting: bool,
        in_flight: int,
        demand: Mapping[str, float] | None = None,
    ) -> Renewal:
        """Extend our registration, say whether we wait, and reconcile our permits.

        ``demand``: the sources we serve now and their weights (None or empty:
        ``{"*": 1}``); the renewal answers our weighted share of the cap.
        """
        sources = json.dumps(dict(sorted((demand or {"*": 1.0}).items())), separators=(",", ":"))
        args = self._args(budget, cap, ttl, held, int(waiting), in_flight, sources)
        out: list[Any] = self._renew(keys=self.keys(budget), args=args)
        self._saw(budget, out[5])  # (this renewal itself re-registered what we hold)
        return Renewal(
            int(out[0]), int(out[1]), int(out[2]), int(out[3]), int(out[4]), int(out[6])
        )

    def demand_channel(self) -> DemandChannel:
        """A connection of its own, subscribed to every budget's demand news (one per process)."""
        return DemandChannel(self._prefix, _client(self._url, DEMAND_BLOCK + 2 * self._timeout))

    def leave(self, budget: str, cap: int, ttl: float) -> None:
        """Give back every permit of ours and forget us (shutdown)."""
        self._leave(keys=self.keys(budget), args=self._args(budget, cap, ttl))

    def close(self) -> None:
        """Close the keeper's client (each WaitChannel is closed by its LeaseWaiter)."""
        self._client.close()


class WaitChannel:
    """One LeaseWaiter's Redis client for ``BLMOVE``, closed only by that waiter.

    The keeper never closes it under a wait in progress: a permit that the
    wait catches after the keeper has stopped can still be put back.
    """

    def __init__(self, store: LeaseStore, client: Any) -> None:
        self.outage_errors = store.outage_errors
        self._keys = store.keys
        self._client = client

    def wait(self, budget: str, block: float) -> bool:
        """Block up to ``block`` s in Redis for a free permit; True when one became ours."""
        free, mine = self._keys(budget)[0], self._keys(budget)[3]
        fleet_clients.follow_master(self._client)  # Sentinel: never wait on a demoted master
        try:
            moved = self._client.blmove(free, mine, block, "LEFT", "RIGHT")
        except Exception as exc:
            raise fleet_clients.unblocked_as_outage(exc) from None
        return moved is not None

    def untake(self, budget: str) -> None:
        """Put back a permit that reached a waiter after its keeper stopped.

        The keeper has left (our list no longer counts in the fleet), so the
        permit moves straight back to the free list, waking the next waiter.
        """
        free, mine = self._keys(budget)[0], self._keys(budget)[3]
        self._client.lmove(mine, free, "RIGHT", "LEFT")

    def close(self) -> None:
        self._client.close()


class DemandChannel:
    """A subscription to the demand news of every budget of ``prefix`` (one DemandListener's).

    News: ``(budget key, process id)`` of a process that started or stopped waiting.
    """

    def __init__(self, prefix: str, client: Any) -> None:
        self.outage_errors = outage_errors()
        self._client = client
        self._pattern = f"{_glob_escape(prefix)}:{{*}}:want"
        self._head = len(prefix) + 2  # "<prefix>:{"
        self._pubsub: Any = None
        self.interrupted = False
        """Set by :meth:`interrupt` (shutdown): no more news, ever."""

    def news(self, block: float) -> list[tuple[str, str]]:
        """Block up to ``block`` s for news; then take whatever else is already there.

        After :meth:`interrupt`, nothing (at once).
        """
        if self.interrupted:
            return []
        if self._pubsub is None:
            self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            self._pubsub.psubscribe(self._pattern)
        out: list[tuple[str, str]] = []
        message = self._pubsub.get_message(timeout=block)
        while message is not None:
            if message.get("type") == "pmessage":
                channel, sender = _text(message["channel"]), _text(message["data"])
                out.append((channel[self._head : -len("}:want")], sender))
            message = self._pubsub.get_message(timeout=0)
        return out

    def interrupt(self) -> None:
        """From another thread (shutdown): end a blocked :meth:`news` now, and every later one.

        Shutting the subscription's socket down wakes the read blocked on it
        (which then fails: the listener sees ``interrupted`` and stops).
        """
        self.interrupted = True
        connection = getattr(self._pubsub, "connection", None)
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.disconnect()

    def reset(self) -> None:
        """Drop the subscription (after an error); the next :meth:`news` subscribes again."""
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()

    def close(self) -> None:
        self.reset()
        self._client.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


DEMAND_BLOCK = 5.0
"""Seconds a DemandListener blocks for news before it checks whether it should stop."""

WAIT_BLOCK = 5.0
"""Seconds a LeaseWaiter blocks in one ``BLMOVE`` before it checks whether it still should."""


def _client(url: str, timeout: float) -> Any:
    # No retries inside redis-py: the keeper decides what an outage means.
    return fleet_clients.connect(fleet_clients.parse(url), timeout)


def slow_reply_errors() -> tuple[type[BaseException], ...]:
    """A reply that did not come within the socket timeout: worth one more try."""
    import redis

    return (redis.exceptions.TimeoutError,)


def error_code(exc: BaseException) -> str:
    """A Redis error's code (``OOM``, ``READONLY``, ``WRONGTYPE``...), never its whole text."""
    words = str(exc).split()
    return words[0] if words and words[0].isupper() else type(exc).__name__


def refusal_errors() -> tuple[type[BaseException], ...]:
    """Redis answered, with an error (``OOM``, ``READONLY``, ``WRONGTYPE``...): no outage.

    Checked after :func:`outage_errors` (whose classes are RedisErrors too).
    """
    import redis

    return (redis.exceptions.RedisError,)


def outage_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "Redis is not answering" (not a bug of ours)."""
    return fleet_clients.outage_errors()


def check_reachable(url: str, prefix: str, timeout: float) -> None:
    """Raise :class:`ConfigurationError` naming ``fleet_url`` if Redis does not answer."""
    store = LeaseStore(url, prefix=prefix, process="check", timeout=timeout)
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
