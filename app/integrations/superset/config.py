"""Superset's config keys -> enginehouse settings, and the integration's own keys.

The Flask extension's mapping (``ENGINE_MANAGER_*``, ``SSH_TUNNEL_TIMEOUT_SEC``,
``DB_CONNECTION_MUTATOR``, every ``ENGINEHOUSE_<SETTING>``) is reused; this
module adds what only the Superset integration reads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from enginehouse.integrations.flask import settings_from_config
from enginehouse.settings import ManagerSettings

log = logging.getLogger("enginehouse.superset")

_LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class TunnelOptions:
    """How Superset's SSH tunnel models become enginehouse bastions."""

    strict_host_keys: bool = False
    local_bind_address: str = _LOOPBACK


def manager_settings(config: Mapping[str, Any]) -> ManagerSettings:
    """ManagerSettings from a Superset config (mode NEW unless configured, as in the seed)."""
    mapped = settings_from_config(config)
    if "mode" not in mapped and "ENGINEHOUSE_MODE" not in os.environ:
        mapped["mode"] = "new"
    packet = config.get("SSH_TUNNEL_PACKET_TIMEOUT_SEC")
    if packet is not None:
        log.debug(
            "SSH_TUNNEL_PACKET_TIMEOUT_SEC=%s: a shared SSH session is kept alive by keepalives; "
            "each step of opening one is bounded by SSH_TUNNEL_TIMEOUT_SEC",
            packet,
        )
    return ManagerSettings.build(**mapped)


def tunnel_options(config: Mapping[str, Any]) -> TunnelOptions:
    """Host key checking and bind address for Superset's tunnels.

    Known keys come from the tunnel's ``server_host_key`` (newer Superset models) and
    the manager's shared known_hosts file (``ENGINEHOUSE_SSH_KNOWN_HOSTS_FILE``).
    """
    bind = str(config.get("SSH_TUNNEL_LOCAL_BIND_ADDRESS") or _LOOPBACK)
    if bind != _LOOPBACK:
        log.warning(
            "SSH_TUNNEL_LOCAL_BIND_ADDRESS=%s: enginehouse forwards listen on %s only",
            bind,
            _LOOPBACK,
        )
    return TunnelOptions(
        strict_host_keys=bool(config.get("SSH_TUNNEL_STRICT_HOST_KEY_CHECKING", False)),
        local_bind_address=_LOOPBACK,
    )
