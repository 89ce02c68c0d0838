"""Flask extension and Superset drop-in: one :class:`EngineManager` per Flask app.

    from enginehouse.integrations.flask import EngineManagerExtension, get_sqla_engine

    engine_manager = EngineManagerExtension(app)      # or .init_app(app) later

    with get_sqla_engine(database, schema="sales") as engine:   # was database.get_sqla_engine(...)
        ...

Configuration comes from ``app.config``: Superset's keys (mapped as in
:data:`SUPERSET_KEYS`, see docs/superset.md) and ``ENGINEHOUSE_<SETTING>``
keys for every :class:`~enginehouse.settings.ManagerSettings` field. A key is only
passed on when the settings have that field, so an older enginehouse
ignores (and logs) what it cannot honour instead of failing to start.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from flask import Flask, current_app, g, has_app_context
from sqlalchemy.engine import Engine

from enginehouse.errors import ConfigurationError
from enginehouse.integrations.content_cache import ContentCache, digest
from enginehouse.manager import EngineManager
from enginehouse.settings import ManagerSettings
from enginehouse.single_flight import SingleFlight
from enginehouse.specs import DatabaseSpec, SSHTunnelSpec

log = logging.getLogger("enginehouse.flask")

EXTENSION_KEY = "enginehouse"
"""Where the extension keeps its state: ``app.extensions["enginehouse"]``."""

SUPERSET_KEYS: dict[str, str] = {
    "ENGINE_MANAGER_MODE": "mode",
    "ENGINE_MANAGER_CLEANUP_INTERVAL": "cleanup_interval",
    "SSH_TUNNEL_TIMEOUT": "tunnel_connect_timeout",
    "SSH_TUNNEL_TIMEOUT_SEC": "tunnel_connect_timeout",
    "DB_CONNECTION_MUTATOR": "connection_mutator",
}
"""Superset config key -> ManagerSettings field (passed only if the field exists)."""

AUTO_START_KEY = "ENGINE_MANAGER_AUTO_START_CLEANUP"
STRICT_HOST_KEY = "SSH_TUNNEL_STRICT_HOST_KEY_CHECKING"
METRICS_PORT_KEY = "ENGINEHOUSE_METRICS_PORT"
_OWN_PREFIX = "ENGINEHOUSE_"


def settings_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """ManagerSettings keywords from a Flask config (ENGINEHOUSE_* keys win over Superset's)."""
    fields = ManagerSettings.model_fields
    values: dict[str, Any] = {}
    for key, field in SUPERSET_KEYS.items():
        if config.get(key) is None:
            continue
        if field not in fields:
            log.info("%s is not supported by this enginehouse version; ignored", key)
            continue
        values[field] = _superset_value(field, config[key])
    for key, value in config.items():
        if not key.startswith(_OWN_PREFIX) or key == METRICS_PORT_KEY:
            continue
        field = key[len(_OWN_PREFIX) :].lower()
        if field not in fields:
            raise ConfigurationError(key, "no such enginehouse setting")
        values[field] = _seconds(value) if isinstance(value, timedelta) else value
    return values


def _superset_value(field: str, value: Any) -> Any:
    if field == "mode":
        # Superset's EngineModes enum, or its name/value as text
        name = getattr(value, "name", None) or getattr(value, "value", value)
        return str(name).lower()
    if isinstance(value, timedelta):
        return _seconds(value)
    if field == "connection_mutator" and callable(value):
        return adapt_mutator(value)
    return value


def _seconds(value: timedelta) -> float:
    return value.total_seconds()


def adapt_mutator(mutator: Callable[..., Any]) -> Callable[..., Any]:
    """Accept Superset's ``(uri, params, username, security_manager, source)`` mutator.

    A mutator already written for enginehouse (keyword-only ``user`` and
    ``source``) is returned unchanged.
    """
    try:
        parameters = inspect.signature(mutator).parameters
    except (TypeError, ValueError):
        return mutator
    keyword_only = {
        name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    if {"user", "source"} <= keyword_only:
        return mutator

    def superset_style(url: Any, kwargs: dict[str, Any], *, user: Any, source: Any) -> Any:
        return mutator(url, kwargs, user, _security_manager(), source)

    superset_style.__qualname__ = f"superset_style({getattr(mutator, '__qualname__', mutator)})"
    return superset_style


def _security_manager() -> Any:
    if not has_app_context():
        return None
    appbuilder = getattr(current_app, "appbuilder", None)
    return getattr(appbuilder, "sm", None)


class _State:
    """What one app holds: its settings, its manager (started now or on first use)."""

    def __init__(self, app: Flask, settings: ManagerSettings) -> None:
        self.settings = settings
        self.strict_host_keys = bool(app.config.get(STRICT_HOST_KEY, False))
        self.metrics_server: Any = None
        self.metrics_port = app.config.get(METRICS_PORT_KEY)
        # (generation, manager) in one attribute: replaced whole, read without a lock
        self._current: tuple[int, EngineManager | None] = (0, None)
        self._starts: SingleFlight[EngineManager] = SingleFlight()

    @property
    def manager(self) -> EngineManager | None:
        """The current manager, if one was started (it may have been shut down since)."""
        return self._current[1]

    def running(self) -> EngineManager:
        """The live manager; concurrent first uses start exactly one."""
        generation, seen = self._current
        if seen is not None and not seen.closed:
            return seen
        return self._starts.run(
            generation, lambda: self._start(generation), self.settings.ask_timeout
        )

    def _start(self, generation: int) -> EngineManager:
        manager = EngineManager(settings=self.settings)
        self._current = (generation + 1, manager)
        log.info("engine manager started (%s mode)", self.settings.mode.value)
        self._serve_metrics()
        return manager

    def _serve_metrics(self) -> None:
        if self.metrics_port is None or self.metrics_server is not None:
            return
        from enginehouse.integrations.metrics import start_metrics_server

        try:
            self.metrics_server = start_metrics_server(self, port=int(self.metrics_port))
        except OSError as exc:  # e.g. several workers given the same port
            log.warning("metrics endpoint not started on port %s: %s", self.metrics_port, exc)

    def stats(self) -> Any:
        """The current manager's stats (what the metrics endpoint reads)."""
        return self.running().stats()

    def get_engine(
        self,
        database: Any,
        *,
        catalog: str | None,
        schema: str | None,
        source: Any,
        user: str | None,
        ssh_tunnel: Any,
    ) -> Engine:
        spec = to_spec(database, ssh_tunnel=ssh_tunnel, strict_host_keys=self.strict_host_keys)
        return self.running().get(
            spec,
            catalog=catalog,
            schema=schema,
            source=_source_name(source),
            user=user if user is not None else current_username(),
        )

    def shutdown(self) -> None:
        server, self.metrics_server = self.metrics_server, None
        if server is not None:
            server.stop()
        generation, manager = self._current
        self._current = (generation + 1, None)
        if manager is not None:
            manager.shutdown()


class EngineManagerExtension:
    """Flask extension: ``EngineManagerExtension(app)`` or ``ext.init_app(app)``."""

    def __init__(self, app: Flask | None = None) -> None:
        self._app = app
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, settings: ManagerSettings | None = None) -> None:
        """Read the app's config (or take ``settings``), register in ``app.extensions``,
        start unless told not to."""
        if EXTENSION_KEY in app.extensions:
            raise ConfigurationError("app.extensions", "enginehouse is already initialised")
        if settings is None:
            settings = ManagerSettings.build(**settings_from_config(app.config))
        state = _State(app, settings)
        app.extensions[EXTENSION_KEY] = state
        if app.config.get(AUTO_START_KEY, True):
            state.running()  # the Janitor starts with the app (Superset's cleanup thread)

    # -- per-app access ----------------------------------------------------------

    def _state(self) -> _State:
        app = current_app if has_app_context() else self._app
        if app is None:
            raise RuntimeError("no Flask app: use inside an app context or pass app")
        state: _State | None = app.extensions.get(EXTENSION_KEY)
        if state is None:
            raise RuntimeError("EngineManagerExtension.init_app(app) was not called")
        return state

    @property
    def manager(self) -> EngineManager:
        """This app's manager (started on first use when auto start is off)."""
        return self._state().running()

    @property
    def settings(self) -> ManagerSettings:
        return self._state().settings

    def get_engine(
        self,
        database: Any,
        *,
        catalog: str | None = None,
        schema: str | None = None,
        source: Any = None,
        user: str | None = None,
        ssh_tunnel: Any = None,
    ) -> Engine:
        """The engine for a Superset ``Database`` model (or a :class:`DatabaseSpec`)."""
        return self._state().get_engine(
            database,
            catalog=catalog,
            schema=schema,
            source=source,
            user=user,
            ssh_tunnel=ssh_tunnel,
        )

    @contextmanager
    def get_sqla_engine(
        self,
        database: Any,
        catalog: str | None = None,
        schema: str | None = None,
        nullpool: bool | None = None,
        source: Any = None,
        override_ssh_tunnel: Any = None,
    ) -> Iterator[Engine]:
        """Shaped like Superset's ``Database.get_sqla_engine``: yields an engine.

        ``nullpool`` is accepted for compatibility and ignored: the manager's
        mode decides (NEW: a NullPool engine per call; SINGLETON: cached pools).

        The engine is cached and shared, so nothing is disposed on exit (in
        NEW mode each engine has a NullPool: there is nothing to keep). A
        Superset ``Database`` under ``enginehouse.superset.install`` is served by
        its own ``get_sqla_engine`` (Superset's steps, then the same hook).
        """
        with _served(self._state, database, catalog, schema, nullpool, source,
                     override_ssh_tunnel) as engine:
            yield engine

    def shutdown(self) -> None:
        """Stop this app's manager (and metrics endpoint); a later use starts a new one."""
        self._state().shutdown()


@contextmanager
def get_sqla_engine(
    database: Any,
    catalog: str | None = None,
    schema: str | None = None,
    nullpool: bool | None = None,
    source: Any = None,
    override_ssh_tunnel: Any = None,
) -> Iterator[Engine]:
    """``with get_sqla_engine(database, schema=...) as engine``, via the current app's manager.

    A Superset ``Database`` under ``enginehouse.superset.install`` goes through its
    own ``get_sqla_engine`` instead: Superset's steps, then the same engine hook.
    """
    state = current_app.extensions.get(EXTENSION_KEY)
    if state is None:
        raise RuntimeError("EngineManagerExtension.init_app(app) was not called")
    with _served(lambda: state, database, catalog, schema, nullpool, source,
                 override_ssh_tunnel) as engine:
        yield engine


@contextmanager
def _served(
    state: Callable[[], _State],
    database: Any,
    catalog: str | None,
    schema: str | None,
    nullpool: bool | None,
    source: Any,
    ssh_tunnel: Any,
) -> Iterator[Engine]:
    """Both ``get_sqla_engine``s: a hooked Superset model's own path, else the app's manager."""
    if ssh_tunnel is None and served_by_superset_hook(database):
        with database.get_sqla_engine(
            catalog=catalog, schema=schema, nullpool=nullpool is not False, source=source
        ) as engine:
            yield engine
        return
    yield state().get_engine(
        database, catalog=catalog, schema=schema, source=source, user=None, ssh_tunnel=ssh_tunnel
    )


def served_by_superset_hook(database: Any) -> bool:
    """Whether ``database`` is a Superset model whose ``get_sqla_engine`` enginehouse wraps."""
    method = getattr(type(database), "get_sqla_engine", None)
    return bool(getattr(method, "__enginehouse_wrapped__", False))


def current_username() -> str | None:
    """The logged-in user's name (``g.user.username``), as Superset impersonates it."""
    if not has_app_context():
        return None
    user = getattr(g, "user", None)
    name = getattr(user, "username", None)
    return name if isinstance(name, str) and name else None


def _source_name(source: Any) -> str | None:
    if source is None:
        return None
    return str(getattr(source, "name", source))  # Superset's QuerySource enum


# -- Superset models -> specs -----------------------------------------------------


def to_spec(
    database: Any, *, ssh_tunnel: Any = None, strict_host_keys: bool = False
) -> DatabaseSpec:
    """A :class:`DatabaseSpec` from a Superset ``Database`` (duck-typed), cached by content.

    Reads ``id``, ``sqlalchemy_uri_decrypted`` (or ``sqlalchemy_uri``),
    ``extra``, ``encrypted_extra``, ``impersonate_user`` and the SSH tunnel
    (``ssh_tunnel`` argument, else ``database.ssh_tunnel``).
    """
    if isinstance(database, DatabaseSpec):
        return database
    tunnel = ssh_tunnel if ssh_tunnel is not None else getattr(database, "ssh_tunnel", None)
    uri = getattr(database, "sqlalchemy_uri_decrypted", None) or database.sqlalchemy_uri
    values = (
        database.id,
        str(uri),
        _text(getattr(database, "extra", None)),
        _text(getattr(database, "encrypted_extra", None)),
        bool(getattr(database, "impersonate_user", False)),
        _tunnel_fields(tunnel, strict_host_keys),
    )
    # Keyed by a digest: the cache never holds a plaintext password or key as its key.
    return _specs.get_or_build(digest(*values), lambda: _build_spec(*values))


TunnelFields = tuple[tuple[str, Any], ...]


def _tunnel_fields(tunnel: Any, strict: bool) -> TunnelFields | None:
    if tunnel is None:
        return None
    if isinstance(tunnel, SSHTunnelSpec):
        return (("spec", tunnel),)  # frozen, hashable: used as it is
    fields = {
        name: getattr(tunnel, name, None)
        for name in (
            "server_address",
            "server_port",
            "username",
            "password",
            "private_key",
            "private_key_password",
        )
    }
    fields = {name: value for name, value in fields.items() if value is not None}
    # SSH_TUNNEL_STRICT_HOST_KEY_CHECKING=True: known host keys only. False keeps our
    # default "pin-first" (remember the first key seen), safer than Superset's accept-all.
    if strict:
        fields["host_key_policy"] = "strict"
    return tuple(sorted(fields.items()))


_specs: ContentCache[DatabaseSpec] = ContentCache()


def _build_spec(
    database_id: int | str,
    uri: str,
    extra: str | None,
    encrypted_extra: str | None,
    impersonate_user: bool,
    tunnel: TunnelFields | None,
) -> DatabaseSpec:
    data: dict[str, Any] = {"id": database_id, "uri": uri, "impersonate_user": impersonate_user}
    if extra:
        data["extra"] = extra
    if encrypted_extra:
        data["encrypted_extra"] = encrypted_extra
    if tunnel is not None:
        fields = dict(tunnel)
        data["ssh_tunnel"] = fields.get("spec", fields)
    return DatabaseSpec(**data)


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)
