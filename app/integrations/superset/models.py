"""What enginehouse needs from Superset's ``Database`` and ``SSHTunnel`` models.

Both are read duck-typed (no Superset import), and what is derived from them
is cached by a digest of their content: cache keys never hold a plaintext
password, key or ``encrypted_extra`` (the values hold them as ``SecretStr``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from enginehouse.errors import InvalidSpecError
from enginehouse.integrations.content_cache import ContentCache, digest
from enginehouse.integrations.superset.config import TunnelOptions
from enginehouse.shares import pool_argument
from enginehouse.specs import SSHTunnelSpec, check_connection_shares

UNSAVED = "unsaved"
"""The database id of a model not saved yet (Superset's test connection)."""

_TUNNEL_FIELDS = (
    "server_address",
    "server_port",
    "username",
    "password",
    "private_key",
    "private_key_password",
    "server_host_key",  # newer Superset models only
)
_STRUCTURE = frozenset({"engine_params", "connect_args"})  # Superset's vocabulary, not secrets


@dataclass(frozen=True)
class DatabaseFacts:
    """One version of one database, as the engine hook needs it."""

    database_id: int | str
    fingerprint: str
    """Changes whenever the URI, password, extra, encrypted extra or tunnel changes."""
    pool: str | None
    """``extra.engine_params.poolclass`` (or the seed's top-level ``extra.poolclass``)."""
    max_connections: int | None
    redact: tuple[str, ...]
    """Texts of ``encrypted_extra`` that errors must mask (longest first)."""
    impersonate_user: bool
    shares: dict[str, Any] | None = None
    """``extra.connection_shares`` as the pool's argument (enginehouse.shares), or None."""


_facts: ContentCache[DatabaseFacts] = ContentCache()
_tunnels: ContentCache[SSHTunnelSpec] = ContentCache()


def database_facts(database: Any) -> DatabaseFacts:
    """The facts of a Superset ``Database`` (duck-typed), cached by content."""
    database_id = getattr(database, "id", None)
    extra = _text(getattr(database, "extra", None))
    encrypted = _text(getattr(database, "encrypted_extra", None))
    tunnel = getattr(database, "ssh_tunnel", None)
    key = digest(
        database_id,
        str(getattr(database, "sqlalchemy_uri_decrypted", None)),
        extra,
        encrypted,
        bool(getattr(database, "impersonate_user", False)),
        _text(getattr(database, "server_cert", None)),
        _tunnel_values(tunnel) if tunnel is not None else None,
    )
    return _facts.get_or_build(key, lambda: _read_facts(database, key, extra, encrypted))


def _read_facts(database: Any, key: str, extra: str | None, encrypted: str | None) -> DatabaseFacts:
    database_id = getattr(database, "id", None)
    parsed = _json_object(extra, "extra")
    params = parsed.get("engine_params") or {}
    pool = params.get("poolclass") if isinstance(params, dict) else None
    return DatabaseFacts(
        database_id=database_id if database_id is not None else UNSAVED,
        fingerprint=key,
        pool=pool if isinstance(pool, str) else parsed.get("poolclass"),
        max_connections=_cap(parsed.get("max_connections")),
        redact=_redactions(encrypted),
        impersonate_user=bool(getattr(database, "impersonate_user", False)),
        shares=_shares(database_id, parsed.get("connection_shares")),
    )


def _shares(database_id: Any, shares: Any) -> dict[str, Any] | None:
    check_connection_shares(shares)
    return pool_argument(database_id, shares) if shares else None


def tunnel_spec(tunnel: Any, options: TunnelOptions) -> SSHTunnelSpec:
    """An :class:`SSHTunnelSpec` from Superset's ``SSHTunnel`` model, cached by content.

    Any key type paramiko reads (RSA, Ed25519, ECDSA); the spec is parsed once per
    content, and the key itself once per bastion session (by its TunnelSupervisor).
    """
    values = _tunnel_values(tunnel)
    key = digest(values, options)
    return _tunnels.get_or_build(key, lambda: _build_tunnel(values, options))


def _build_tunnel(values: tuple[tuple[str, Any], ...], options: TunnelOptions) -> SSHTunnelSpec:
    fields = {name: value for name, value in values if value not in (None, "")}
    host_key = fields.pop("server_host_key", None)
    policy = "strict" if options.strict_host_keys else "pin-first"
    data: dict[str, Any] = {**fields, "host_key_policy": policy}
    if host_key:
        data["host_key"] = str(host_key)
    return SSHTunnelSpec(**data)


def _tunnel_values(tunnel: Any) -> tuple[tuple[str, Any], ...]:
    return tuple((name, getattr(tunnel, name, None)) for name in _TUNNEL_FIELDS)


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _json_object(text: str | None, field: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        raise InvalidSpecError(field, "not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidSpecError(field, "must be a JSON object")
    return value


def _cap(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidSpecError("extra.max_connections", "must be an integer >= 1")
    return value


def _redactions(encrypted: str | None) -> tuple[str, ...]:
    if not encrypted:
        return ()
    try:
        value = json.loads(encrypted)
    except ValueError:
        return (encrypted,)
    found = _strings(value)
    return tuple(sorted(found, key=len, reverse=True))


def _strings(value: Any) -> set[str]:
    if isinstance(value, dict):
        keys = {str(k) for k in value if len(str(k)) >= 4 and k not in _STRUCTURE}
        return keys | set().union(*(_strings(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_strings(v) for v in value))
    return {value} if isinstance(value, str) and len(value) >= 4 else set()
