"""Redis clients for ``fleet_url``: one server, a Sentinel-managed master, or a Cluster.

``fleet_url`` names where the fleet's leases live:

- ``redis://[[user]:password@]host[:port][/db]`` (also ``rediss://`` for TLS and
  ``unix:///path?db=N``): one Redis or Valkey server.
- ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]``
  (``rediss+sentinel://`` for TLS to the servers): the master that the
  Sentinels name for ``service``; port 26379 by default. The password is the
  servers'; Sentinels that want one of their own get it as
  ``?sentinel_password=...``. After a failover the client asks the Sentinels
  for the new master on its next connection.
- ``redis+cluster://[[user]:password@]host[:port][,host[:port]...]``
  (``rediss+cluster://``): a Redis Cluster, bootstrapped from any of the
  nodes listed; a budget's keys share one hash tag, so one node serves each
  budget's scripts and blocking waits.

Errors never echo the URL: it may hold a password.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

SINGLE = ("redis", "rediss", "unix")
SENTINEL = ("redis+sentinel", "rediss+sentinel")
CLUSTER = ("redis+cluster", "rediss+cluster")
SCHEMES = SINGLE + SENTINEL + CLUSTER

_DEFAULT_PORT = {"single": 6379, "sentinel": 26379, "cluster": 6379}


@dataclass(frozen=True)
class FleetTarget:
    """A parsed ``fleet_url``: what kind of deployment, and where."""

    kind: str
    """``single``, ``sentinel`` or ``cluster``."""
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = None
    tls: bool = False
    service: str = ""
    db: int = 0
    sentinel_password: str | None = None

    def where(self) -> str:
        """Where the leases live, safe to log (no user, no password)."""
        if self.kind == "single":
            parts = urlsplit(self.url)
            if parts.scheme == "unix":
                return f"unix:{parts.path}"
            return f"{parts.hostname}:{parts.port or 6379}"
        nodes = ",".join(f"{host}:{port}" for host, port in self.hosts)
        if self.kind == "sentinel":
            return f"sentinel {self.service} via {nodes}"
        return f"cluster {nodes}"


def parse(url: str) -> FleetTarget:
    """Parse ``url``; ValueError saying what is wrong, never echoing the URL."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("not a valid URL (redis://host:port/db)") from None
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")
    if scheme in SINGLE:
        return _parse_single(url, parts)
    kind = "sentinel" if scheme in SENTINEL else "cluster"
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, password = _credentials(userinfo)
    hosts = _hosts(hostlist, _DEFAULT_PORT[kind])
    query = parse_qs(parts.query)
    target = FleetTarget(
        kind=kind, url=url, hosts=hosts, username=username, password=password,
        tls=scheme.startswith("rediss"),
    )
    if kind == "cluster":
        if parts.path not in ("", "/", "/0"):
            raise ValueError("a Redis Cluster has database 0 only (redis+cluster://host:port)")
        return target
    service, db = _service_and_db(parts.path)
    secret = query.get("sentinel_password", [None])[0]
    return FleetTarget(**{**target.__dict__, "service": service, "db": db,
                          "sentinel_password": secret})


def _parse_single(url: str, parts: Any) -> FleetTarget:
    try:
        port = parts.port
    except ValueError:
        raise ValueError("port must be a number 1-65535") from None
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("names no host (redis://host:port/db)")
    if port == 0:
        raise ValueError("port must be 1-65535")
    return FleetTarget(kind="single", url=url)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def _hosts(hostlist: str, default_port: int) -> tuple[tuple[str, int], ...]:
    hosts = []
    for item in hostlist.split(","):
        if not item.strip():
            raise ValueError("names an empty host (host:port,host:port)")
        try:
            node = urlsplit(f"//{item.strip()}")
            port = node.port
        except ValueError:
            raise ValueError("a host's port must be a number 1-65535") from None
        if not node.hostname or port == 0:
            raise ValueError("each host must be host or host:port (port 1-65535)")
        hosts.append((node.hostname, port or default_port))
    return tuple(hosts)


def _service_and_db(path: str) -> tuple[str, int]:
    pieces = [unquote(p) for p in path.split("/") if p]
    if not pieces or len(pieces) > 2:
        raise ValueError("must name the Sentinel service: redis+sentinel://host:port/service[/db]")
    db = 0
    if len(pieces) == 2:
        if not pieces[1].isdigit():
            raise ValueError("the database after the service must be a number")
        db = int(pieces[1])
    return pieces[0], db


def connect(target: FleetTarget, timeout: float) -> Any:
    """A redis-py client for ``target`` that never retries by itself.

    The BudgetKeeper decides what a failed call means (a passing failure or
    an outage), so redis-py makes each call once: ``timeout`` bounds a reply,
    and connecting takes at most ``min(timeout, 1 s)``.
    """
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": min(timeout, 1.0),
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if target.kind == "sentinel":
        return _sentinel_master(target, options)
    if target.kind == "cluster":
        return _cluster(target, options)
    import redis

    return redis.Redis.from_url(target.url, retry_on_timeout=False, **options)


def _sentinel_master(target: FleetTarget, options: dict[str, Any]) -> Any:
    from redis.sentinel import Sentinel

    sentinel_options = {k: v for k, v in options.items() if k != "health_check_interval"}
    if target.sentinel_password is not None:
        sentinel_options["password"] = target.sentinel_password
    sentinel = Sentinel(list(target.hosts), sentinel_kwargs=sentinel_options, **options)
    client = sentinel.master_for(
        target.service, redis_class=_sentinel_client_class(), db=target.db,
        username=target.username, password=target.password, ssl=target.tls,
    )
    client.sentinel_clients = tuple(sentinel.sentinels)
    return client


def _cluster(target: FleetTarget, options: dict[str, Any]) -> Any:
    import redis
    from redis.cluster import ClusterNode, RedisCluster

    extra: dict[str, Any] = {}
    if int(redis.__version__.split(".")[0]) < 6:
        extra["cluster_error_retry_attempts"] = 0  # later versions take `retry` alone
    options = {k: v for k, v in options.items() if k != "health_check_interval"}
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
        username=target.username, password=target.password, ssl=target.tls,
        **options, **extra,
    )


@functools.cache
def _sentinel_client_class() -> type:
    import redis

    class SentinelMasterClient(redis.Redis):
        """The master's client; closing it closes its connections to the Sentinels too."""

        sentinel_clients: tuple[Any, ...] = ()

        def close(self) -> None:
            super().close()
            for client in self.sentinel_clients:
                client.close()

    return SentinelMasterClient


FOLLOW_EVERY = 1.0
"""Seconds between two questions to the Sentinels about the master, per client."""


def follow_master(client: Any) -> bool:
    """Sentinel: ask who is master now (at most every ``FOLLOW_EVERY`` s); True if it moved.

    After a failover the old master may still accept writes for a while (until
    the Sentinels demote it): connections opened before the failover would go
    on talking to it, split from the rest of the fleet. redis-py's Sentinel
    pool drops its idle connections when the master's address changes, so the
    next call reaches the new master. Other clients: nothing to do (False).
    """
    pool: Any = getattr(client, "connection_pool", None)
    if pool is None or not getattr(pool, "is_master", False):
        return False
    now = time.monotonic()
    if now < getattr(client, "next_follow", 0.0):
        return False
    client.next_follow = now + FOLLOW_EVERY
    before = pool.master_address
    return before is not None and pool.get_master_address() != before


def outage_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the fleet's Redis is not answering (right now)".

    Besides a dropped or late connection: a cluster whose slot is moving or
    whose node failed (``CLUSTERDOWN``, ``TRYAGAIN``, ``MASTERDOWN``), and a
    blocked wait that the server ended because it stopped being the master
    (redis-py turns ``READONLY`` into a ConnectionError for Sentinel clients;
    ``UNBLOCKED`` is turned into one by :func:`unblocked_as_outage`).
    """
    import redis
    from redis import exceptions as e

    cluster = (e.ClusterDownError, e.TryAgainError, e.MasterDownError, e.SlotNotCoveredError)
    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, *cluster)


def unblocked_as_outage(exc: BaseException) -> BaseException:
    """A blocking wait ended by a role change (``UNBLOCKED ...``) counts as a dropped connection."""
    import redis

    if isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith("UNBLOCKED"):
        return redis.exceptions.ConnectionError("the server ended our blocking wait (role change)")
    return exc
