"""Superset's SSH manager, answered by enginehouse's shared tunnels.

Superset calls ``ssh_manager_factory.instance.create_tunnel(ssh_tunnel=...,
sqlalchemy_database_uri=...)`` for every engine it asks for, enters the
result, then ``build_sqla_url(uri, server)`` points the URL at
``server.local_bind_address`` / ``server.local_bind_port``. Stock 6.1 opens a
new SSH session (and parses an RSA key) each time; here the context is the
shared forward of the bastion's one session per process: a stable local port,
any key type, the key parsed once per session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import URL, make_url

from enginehouse.errors import InvalidSpecError
from enginehouse.integrations.superset.config import TunnelOptions
from enginehouse.integrations.superset.cooperative import ensure_cooperative
from enginehouse.integrations.superset.engine_hook import FORWARD, Forward
from enginehouse.integrations.superset.models import UNSAVED, tunnel_spec
from enginehouse.manager import EngineManager

DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "oracle": 1521, "mssql": 1433}
"""Superset 6.1's ``superset.utils.ssh_tunnel.DEFAULT_PORTS``: a port-less URI tunnels there."""


class TunnelContext:
    """What ``create_tunnel`` returns: a context manager shaped like sshtunnel's forwarder.

    Entering it records the forward for the engine hook; nothing opens or
    closes on enter and exit (the forward is shared and outlives the request).
    """

    def __init__(self, forward: Forward) -> None:
        self.forward = forward
        self.local_bind_address = (forward.local_host, forward.local_port)
        self.local_bind_port = forward.local_port
        self.local_bind_host = forward.local_host
        self.is_active = True
        self._tokens: list[Any] = []

    def __enter__(self) -> TunnelContext:
        self._tokens.append(FORWARD.set(self.forward))
        return self

    def __exit__(self, *exc_info: object) -> None:
        FORWARD.reset(self._tokens.pop())

    def start(self) -> None:
        """sshtunnel's API: the shared forward is already listening."""

    def stop(self, force: bool = False) -> None:
        """sshtunnel's API: the shared forward is closed by the manager, not per request."""


class SSHManager:
    """``SSH_TUNNEL_MANAGER_CLASS``-compatible; :func:`install` sets one on Superset."""

    def __init__(self, manager: Callable[[], EngineManager], options: TunnelOptions) -> None:
        self._manager = manager
        self.options = options
        self.local_bind_address = options.local_bind_address

    def create_tunnel(self, ssh_tunnel: Any, sqlalchemy_database_uri: Any) -> TunnelContext:
        url = _url(sqlalchemy_database_uri)
        if not url.host:
            raise InvalidSpecError("sqlalchemy_uri", "an SSH tunneled database needs a host")
        port = url.port or DEFAULT_PORTS.get(url.get_backend_name())
        if port is None:
            raise InvalidSpecError("sqlalchemy_uri", "give the port to tunnel this database")
        ensure_cooperative()  # psycopg2 must yield to gevent before it meets our relay
        spec = tunnel_spec(ssh_tunnel, self.options)
        owner = getattr(ssh_tunnel, "database_id", None)
        local_port = self._manager().open_forward(
            spec, url.host, port, owner=owner if owner is not None else UNSAVED
        )
        return TunnelContext(Forward(spec, url.host, port, "127.0.0.1", local_port))

    def build_sqla_url(self, sqlalchemy_url: Any, server: Any) -> URL:
        """The URL pointed at the forward (as Superset's own manager does)."""
        return _url(sqlalchemy_url).set(
            host=server.local_bind_address[0], port=server.local_bind_port
        )


def _url(value: Any) -> URL:
    return value if isinstance(value, URL) else make_url(str(value).strip())
