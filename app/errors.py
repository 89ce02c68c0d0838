"""Every error enginehouse raises derives from :class:`EngineManagerError`.

Messages name the field or the step that failed and never carry a secret:
passwords, keys and tokens are masked before any error is built.
"""

from __future__ import annotations


class EngineManagerError(Exception):
    """Base class of every error raised by enginehouse."""


class InvalidSpecError(EngineManagerError, ValueError):
    """A :class:`~app.DatabaseSpec`, :class:`~app.SSHTunnelSpec` or request is invalid.

    ``field`` names the offending input (``uri``, ``extra.engine_params.pool_size``,
    ``schema``...), so callers can point a user at it.
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class ConfigurationError(EngineManagerError, ValueError):
    """A manager setting is invalid (``field`` names the setting)."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"setting {field}: {reason}")


class EngineCreationError(EngineManagerError):
    """Building an engine failed at ``step`` (for example ``create_engine``)."""

    def __init__(self, step: str, reason: str, *, database_id: object = None) -> None:
        self.step = step
        self.reason = reason
        self.database_id = database_id
        where = f" for database {database_id}" if database_id is not None else ""
        super().__init__(f"{step} failed{where}: {reason}")


class DriverNotInstalledError(EngineCreationError):
    """The DBAPI driver that the URI names is not importable."""


class ManagerShutDownError(EngineManagerError, RuntimeError):
    """The manager was shut down; it serves no more calls."""


class ActorTimeoutError(EngineManagerError, TimeoutError):
    """An actor did not answer within ``ask_timeout``."""


class ActorUnavailableError(EngineManagerError, RuntimeError):
    """An actor crashed more often than its restart policy allows."""


class TunnelError(EngineManagerError):
    """An SSH tunnel could not be opened or kept alive (names the bastion and why)."""


class PoolExhaustedError(EngineManagerError, TimeoutError):
    """No connection became available within ``pool_timeout``."""


class UnsafeURIError(InvalidSpecError):
    """The URI validator refused a database URI; ``rule`` names the rule it broke."""

    def __init__(self, rule: str, reason: str) -> None:
        self.rule = rule
        super().__init__("uri", f"refused by rule {rule!r}: {reason}")


class FleetUnavailableError(EngineManagerError, ConnectionError):
    """Fleet mode: Redis is unreachable and ``fleet_fallback="closed"`` refuses new connections."""


class ConnectFailedError(EngineManagerError, ConnectionError):
    """``manager.connect()`` could not open or check out a connection: the database or
    the network refused (the driver's words, with the spec's secrets masked).

    ``driver_error`` names the driver's exception class (e.g. ``OperationalError``).
    """

    def __init__(self, message: str, driver_error: str) -> None:
        super().__init__(message)
        self.driver_error = driver_error
