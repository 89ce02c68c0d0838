"""Manager settings: keyword arguments, or environment variables ``ENGINEHOUSE_*``."""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    ImportString,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from enginehouse.compat import StrEnum
from enginehouse.errors import ConfigurationError
from enginehouse.fleet import check_url as check_fleet_url


class Mode(StrEnum):
    """How engines are shared.

    ``NEW``: every ``get()`` builds a fresh engine on ``NullPool``; nothing is cached.
    ``SINGLETON``: one engine per key, cached, with the pool the database's extra asks for.
    """

    NEW = "new"
    SINGLETON = "singleton"


ConnectionMutator = Callable[..., tuple[Any, dict[str, Any]]]
"""``(url, engine_kwargs, *, user, source) -> (url, engine_kwargs)``."""

UriValidator = Callable[..., None]
"""``(url, database) -> None``; raises :class:`~enginehouse.errors.InvalidSpecError` to refuse."""

EngineContext = Callable[..., AbstractContextManager[Any]]
"""``(database, *, catalog, schema, user, source) -> context manager`` around ``connect()``."""

Decryptor = Callable[[str], Any]
"""Stored ``encrypted_extra`` ciphertext -> its JSON text (or the decoded object)."""


HOUR = 3600
DAY = 24 * HOUR
WEEK = 7 * DAY


def duration(default: float, most: float, description: str, *, zero_ok: bool = False) -> Any:
    """A setting in seconds: finite, > 0 (>= 0 with ``zero_ok``), at most ``most``.

    NaN or Infinity would spin or overflow a wait (threading refuses timeouts
    past ``threading.TIMEOUT_MAX``); no sane setting comes near the bounds.
    """
    if zero_ok:
        return Field(default=default, ge=0, le=most, allow_inf_nan=False, description=description)
    return Field(default=default, gt=0, le=most, allow_inf_nan=False, description=description)


class ManagerSettings(BaseSettings):
    """Every setting of :class:`~app.EngineManager`, with its default.

    Each may also come from the environment as ``ENGINEHOUSE_<NAME>``
    (``ENGINEHOUSE_MODE=new``, ``ENGINEHOUSE_CONNECTION_MUTATOR=pkg.module.func``).
    """

    model_config = SettingsConfigDict(
        env_prefix="ENGINEHOUSE_", frozen=True, extra="forbid", case_sensitive=False
    )

    mode: Mode = Field(
        default=Mode.SINGLETON,
        description="singleton: cache engines per key; new: a NullPool engine per get()",
    )
    idle_timeout: float = duration(300.0, WEEK, "s an engine may stay unused")
    max_engines: int = Field(
        default=256, ge=1, le=1_000_000, description="LRU bound on cached engines"
    )
    cleanup_interval: float = duration(30.0, DAY, "s between Janitor sweeps")
    ask_timeout: float = duration(10.0, HOUR, "s any actor call may take")
    leak_detection_threshold: float | None = Field(
        default=None, gt=0, le=DAY, allow_inf_nan=False,
        description="s a connection may stay checked out before a leak warning (off by default)",
    )
    connection_mutator: ImportString[ConnectionMutator] | None = Field(
        default=None, description="(url, engine_kwargs, *, user, source) -> (url, engine_kwargs)"
    )
    restart_max: int = Field(
        default=5, ge=0, le=1_000_000, description="restarts allowed per restart_period"
    )
    restart_period: float = duration(
        60.0, DAY, "s window in which restart_max restarts are allowed"
    )
    restart_backoff: float = duration(0.05, HOUR, "first restart delay, s", zero_ok=True)
    restart_backoff_max: float = duration(
        2.0, HOUR, "cap of the doubling restart delay, s", zero_ok=True
    )
    tunnel_idle_timeout: float = duration(
        600.0, WEEK, "s an SSH session with no open channel stays up"
    )
    tunnel_connect_timeout: float = duration(
        5.0, HOUR, "s each step of opening an SSH session may take"
    )
    tunnel_keepalive_interval: float = Field(
        default=5.0, gt=0, description="s between SSH keepalives that expect the bastion's reply"
    )
    tunnel_keepalive_timeout: float = Field(
        default=5.0,
        gt=0,
        description="s without a keepalive reply after which the SSH session is closed as dead",
    )
    ssh_known_hosts_file: Path | None = Field(
        default=None,
        description=(
            "known_hosts file shared by the host's processes: host-key checks read it, "
            "pin-first appends its pins; unset: $XDG_STATE_HOME/enginehouse/known_hosts "
            "(~/.local/state/enginehouse/known_hosts)"
        ),
    )
    ssh_transport: Literal["paramiko", "openssh"] = Field(
        default="paramiko",
        description=(
            "how tunnels speak SSH: paramiko (in-process, relays in Python) or openssh "
            "(a supervised ssh -N -M per bastion, forwards by ssh -O forward; "
            "needs the ssh client)"
        ),
    )
    # -- parity with Superset's manager (see docs/security.md, docs/adapters.md) --
    uri_validator: ImportString[UriValidator] | None = Field(
        default=None, description="(url, database) -> None; raise InvalidSpecError to refuse"
    )
    forbid_unsafe_uris: bool = Field(
        default=True, description="refuse SQLite files and denied_dialects before connecting"
    )
    allow_sqlite_memory: bool = Field(
        default=False, description="with forbid_unsafe_uris, still allow in-memory SQLite"
    )
    denied_dialects: tuple[str, ...] = Field(
        default=("shillelagh",), description="backends or drivernames forbid_unsafe_uris refuses"
    )
    encrypted_extra_decryptor: ImportString[Decryptor] | None = Field(
        default=None, description="stored encrypted_extra ciphertext -> its JSON text"
    )
    engine_context: ImportString[EngineContext] | None = Field(
        default=None,
        description="(database, *, catalog, schema, user, source) -> context manager, "
        "entered around connect()",
    )
    impersonate_with_email_prefix: bool = Field(
        default=False, description="impersonate 'alice' for user 'alice@example.com'"
    )
    # -- connection budgets and fleet mode (see docs/fleet.md) --
    default_max_connections: int | None = Field(
        default=None, ge=1, le=100_000,
        description="per-database connection cap when extra sets none",
    )
    max_tunnels_per_bastion: int | None = Field(
        default=None, ge=1, le=10_000, description="SSH sessions allowed at once per bastion"
    )
    fleet_url: SecretStr | None = Field(
        default=None,
        description=(
            "redis://host:port/db, redis+sentinel://host:port,.../service/db or "
            "redis+cluster://host:port,...: budgets hold across processes"
        ),
    )
    fleet_fallback: Literal["closed", "local"] = Field(
        default="closed", description="without Redis: refuse new connections, or a local share"
    )
    fleet_lease_ttl: float = duration(90.0, WEEK, "s a fleet lease outlives its last renewal")
    fleet_prefix: str = Field(
        default="enginehouse",
        min_length=1,
        description=(
            "Namespace of the budgets: the Redis key prefix in fleet mode; embedded, managers "
            "of one process with the same prefix share each database's cap"
        ),
    )

    @field_validator("fleet_url")
    @classmethod
    def _check_fleet_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_fleet_url(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _renewed_in_time(self) -> ManagerSettings:
        if self.fleet_url is not None and self.fleet_lease_ttl < 2 * self.cleanup_interval:
            raise ConfigurationError(
                "fleet_lease_ttl", "must be at least 2 x cleanup_interval (leases renew each round)"
            )
        return self

    @classmethod
    def build(cls, **values: Any) -> ManagerSettings:
        """Validate settings, raising :class:`ConfigurationError` naming the setting."""
        try:
            return cls(**values)
        except SettingsError as exc:  # an ENGINEHOUSE_* variable that does not parse
            raise ConfigurationError(_env_field(str(exc)), "cannot parse its value") from None
        except ValidationError as exc:
            first = exc.errors(include_input=False, include_url=False)[0]
            cause = first.get("ctx", {}).get("error")
            if isinstance(cause, ConfigurationError):
                raise ConfigurationError(cause.field, cause.reason) from None
            field = ".".join(str(part) for part in first["loc"]) or "settings"
            raise ConfigurationError(field, first["msg"]) from None


def _env_field(message: str) -> str:
    """The setting a pydantic-settings parse error names (``error parsing value for field "x"``)."""
    match = re.search(r'field "([a-z_]+)"', message)
    return match.group(1) if match else "environment"
