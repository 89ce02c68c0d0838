"""Per-dialect rules for catalogs, schemas and impersonation.

An adapter turns a database's URL and engine arguments into the ones for a
given catalog, schema and user, and places an OAuth2 access token where its
driver expects one. Adapters are looked up by the URL's backend name: those
given to :func:`register_adapter`, the built-in ones, then those third-party
packages declare in the ``enginehouse.adapters`` entry point group (see
docs/adapters.md).
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

from sqlalchemy.engine import URL

from enginehouse.errors import InvalidSpecError

ENTRY_POINT_GROUP = "enginehouse.adapters"
"""Entry point group a package uses to add adapters: ``<backend> = "pkg.module:Adapter"``."""

log = logging.getLogger("enginehouse.adapters")


@runtime_checkable
class DialectAdapter(Protocol):
    """What an adapter must offer. ``adjust`` must not mutate its inputs.

    ``adjust`` is called once per engine (``access_token=None``) to place the
    catalog, schema and user; then, when the caller handed in an access token,
    at each new DBAPI connection with only ``access_token`` set, on the already
    adjusted URL, to place the current token (in the URL or ``connect_args``).
    An adapter may also define ``merge_encrypted_extra(engine_params,
    encrypted_extra) -> engine_params``; :func:`merge_encrypted_extra` is used
    when it does not.
    """

    supports_catalog: bool
    supports_schema: bool
    supports_impersonation: bool

    def adjust(
        self,
        url: URL,
        engine_kwargs: dict[str, Any],
        *,
        catalog: str | None,
        schema: str | None,
        user: str | None,
        access_token: str | None = None,
    ) -> tuple[URL, dict[str, Any]]: ...


class BaseAdapter:
    """Checks capabilities, impersonates through the URL username; subclasses place the rest."""

    name: ClassVar[str] = "generic"
    supports_catalog: bool = False
    supports_schema: bool = False
    supports_impersonation: bool = True

    def adjust(
        self,
        url: URL,
        engine_kwargs: dict[str, Any],
        *,
        catalog: str | None,
        schema: str | None,
        user: str | None,
        access_token: str | None = None,
    ) -> tuple[URL, dict[str, Any]]:
        self._check("catalog", catalog, self.supports_catalog)
        self._check("schema", schema, self.supports_schema)
        kwargs = dict(engine_kwargs)
        kwargs["connect_args"] = dict(kwargs.get("connect_args") or {})
        if user is not None:
            self._check("user", user, self.supports_impersonation)
            url, kwargs = self.place_user(url, kwargs, user)
        if catalog is not None:
            url, kwargs = self.place_catalog(url, kwargs, catalog)
        if schema is not None:
            url, kwargs = self.place_schema(url, kwargs, schema)
        if access_token is not None:
            self._check("access_token", access_token, self.supports_impersonation)
            url, kwargs = self.place_token(url, kwargs, access_token)
        return url, kwargs

    def merge_encrypted_extra(
        self, engine_params: dict[str, Any], encrypted_extra: dict[str, Any]
    ) -> dict[str, Any]:
        """Engine parameters with the decrypted extra merged in (default: a deep merge)."""
        return merge_encrypted_extra(engine_params, encrypted_extra)

    def place_user(self, url: URL, kwargs: dict[str, Any], user: str) -> tuple[URL, dict[str, Any]]:
        """Impersonate ``user``: by default the URL's username."""
        return url.set(username=user), kwargs

    def place_token(
        self, url: URL, kwargs: dict[str, Any], token: str
    ) -> tuple[URL, dict[str, Any]]:
        """Send an OAuth2 access token: by default as the password (cloud IAM logins)."""
        return url.set(password=token), kwargs

    def place_catalog(
        self, url: URL, kwargs: dict[str, Any], catalog: str
    ) -> tuple[URL, dict[str, Any]]:
        return url, kwargs

    def place_schema(
        self, url: URL, kwargs: dict[str, Any], schema: str
    ) -> tuple[URL, dict[str, Any]]:
        return url, kwargs

    def _check(self, field: str, value: str | None, supported: bool) -> None:
        if value is None:
            return
        if not supported:
            raise InvalidSpecError(field, f"the {self.name} adapter does not support a {field}")
        if not isinstance(value, str) or not value or "\x00" in value:
            raise InvalidSpecError(field, "must be a non-empty string")


class PostgresAdapter(BaseAdapter):
    """Catalog = database name; schema = ``search_path`` through libpq's ``options``."""

    name = "postgresql"
    supports_catalog = True
    supports_schema = True

    def place_catalog(
        self, url: URL, kwargs: dict[str, Any], catalog: str
    ) -> tuple[URL, dict[str, Any]]:
        return url.set(database=catalog), kwargs

    def place_schema(
        self, url: URL, kwargs: dict[str, Any], schema: str
    ) -> tuple[URL, dict[str, Any]]:
        connect_args = kwargs["connect_args"]
        option = "-csearch_path=" + _libpq_escape(_quote_ident(schema))
        existing = connect_args.get("options")
        connect_args["options"] = f"{existing} {option}" if existing else option
        return url, kwargs


class MySQLAdapter(BaseAdapter):
    """MySQL and MariaDB have no catalogs; the schema is the database."""

    name = "mysql"
    supports_schema = True

    def place_schema(
        self, url: URL, kwargs: dict[str, Any], schema: str
    ) -> tuple[URL, dict[str, Any]]:
        return url.set(database=schema), kwargs


class SQLiteAdapter(BaseAdapter):
    """A SQLite file is one database: no catalogs, no schemas, no users."""

    name = "sqlite"
    supports_impersonation = False


class TrinoAdapter(BaseAdapter):
    """Trino: ``trino://principal@host:port/catalog/schema``.

    The URL's username stays the authenticated principal; the impersonated
    user goes into the ``user`` connect argument (Trino's session user). An
    access token goes into the URL query as ``access_token``, which the trino
    dialect turns into JWT authentication over HTTPS. Needs no trino import.
    """

    name = "trino"
    supports_catalog = True
    supports_schema = True

    def place_user(self, url: URL, kwargs: dict[str, Any], user: str) -> tuple[URL, dict[str, Any]]:
        kwargs["connect_args"]["user"] = user
        return url, kwargs

    def place_catalog(
        self, url: URL, kwargs: dict[str, Any], catalog: str
    ) -> tuple[URL, dict[str, Any]]:
        # The URI's schema belonged to its catalog: a new catalog starts without one.
        return url.set(database=_path_part("catalog", catalog)), kwargs

    def place_schema(
        self, url: URL, kwargs: dict[str, Any], schema: str
    ) -> tuple[URL, dict[str, Any]]:
        catalog = (url.database or "").split("/")[0]
        if not catalog:
            raise InvalidSpecError("schema", "the trino adapter needs a catalog to place a schema")
        return url.set(database=f"{catalog}/{_path_part('schema', schema)}"), kwargs

    def place_token(
        self, url: URL, kwargs: dict[str, Any], token: str
    ) -> tuple[URL, dict[str, Any]]:
        return url.update_query_dict({"access_token": token}), kwargs


_ADAPTERS: dict[str, DialectAdapter] = {
    "postgresql": PostgresAdapter(),
    "mysql": MySQLAdapter(),
    "mariadb": MySQLAdapter(),
    "sqlite": SQLiteAdapter(),
    "trino": TrinoAdapter(),
}
_GENERIC = BaseAdapter()
_NOT_PLUGGED: set[str] = set()  # backends no entry point provides (until refresh_adapters)


def register_adapter(backend: str, adapter: DialectAdapter) -> None:
    """Use ``adapter`` for URLs whose backend name is ``backend`` (overrides any other)."""
    if not isinstance(adapter, DialectAdapter):
        raise InvalidSpecError("adapter", "does not implement the DialectAdapter protocol")
    _ADAPTERS[backend] = adapter


def adapter_for(backend: str) -> DialectAdapter:
    """The adapter for a backend; a generic one (no catalog, no schema) otherwise."""
    adapter = _ADAPTERS.get(backend)
    if adapter is None:
        adapter = _from_entry_point(backend)
    return adapter if adapter is not None else _GENERIC


def has_adapter(backend: str) -> bool:
    """Whether a registered, built-in or entry-point adapter serves ``backend``."""
    if backend in _ADAPTERS:
        return True
    if backend in _NOT_PLUGGED:
        return False
    if entry_points(group=ENTRY_POINT_GROUP, name=backend):
        return True
    _NOT_PLUGGED.add(backend)
    return False


def refresh_adapters() -> None:
    """Look at entry points again (after installing an adapter package at run time)."""
    _NOT_PLUGGED.clear()


def merge_encrypted_extra(
    engine_params: dict[str, Any], encrypted_extra: dict[str, Any]
) -> dict[str, Any]:
    """``encrypted_extra["engine_params"]`` deep-merged over ``engine_params``.

    Nested objects (``connect_args``...) merge key by key; the encrypted value
    wins. Other top-level keys are left to adapters that know them.
    """
    secret = encrypted_extra.get("engine_params") or {}
    if not isinstance(secret, dict):
        raise InvalidSpecError("encrypted_extra.engine_params", "must be a JSON object")
    return _deep_merge(engine_params, secret)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _from_entry_point(backend: str) -> DialectAdapter | None:
    if backend in _NOT_PLUGGED:
        return None
    found = entry_points(group=ENTRY_POINT_GROUP, name=backend)
    if not found:
        _NOT_PLUGGED.add(backend)
        return None
    point = next(iter(found))
    where = f"entry point {point.name!r} ({point.value}) of {ENTRY_POINT_GROUP}"
    try:
        loaded = point.load()
        adapter = loaded() if isinstance(loaded, type) else loaded
    except Exception as exc:
        raise InvalidSpecError("adapter", f"{where} failed to load: {type(exc).__name__}") from exc
    if not isinstance(adapter, DialectAdapter):
        raise InvalidSpecError("adapter", f"{where} does not implement DialectAdapter")
    _ADAPTERS.setdefault(backend, adapter)
    log.info("adapter for %s loaded from %s", backend, where)
    return _ADAPTERS[backend]


def _path_part(field: str, value: str) -> str:
    if "/" in value:
        raise InvalidSpecError(field, "must not contain '/' (it separates catalog and schema)")
    return value


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _libpq_escape(value: str) -> str:
    # libpq splits ``options`` on whitespace; a backslash keeps the next char literal.
    return value.replace("\\", "\\\\").replace(" ", "\\ ")
