"""Per-dialect rules for catalogs, schemas and impersonation.

An adapter turns a database's URL and engine arguments into the ones for a
given catalog, schema and user. Adapters are looked up by the URL's backend
name; register more with :func:`register_adapter`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from sqlalchemy.engine import URL

from app.errors import InvalidSpecError


@runtime_checkable
class DialectAdapter(Protocol):
    """What an adapter must offer. ``adjust`` must not mutate its inputs."""

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
            url = url.set(username=user)
        if catalog is not None:
            url, kwargs = self.place_catalog(url, kwargs, catalog)
        if schema is not None:
            url, kwargs = self.place_schema(url, kwargs, schema)
        return url, kwargs

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


_ADAPTERS: dict[str, DialectAdapter] = {
    "postgresql": PostgresAdapter(),
    "mysql": MySQLAdapter(),
    "mariadb": MySQLAdapter(),
    "sqlite": SQLiteAdapter(),
}
_GENERIC = BaseAdapter()


def register_adapter(backend: str, adapter: DialectAdapter) -> None:
    """Use ``adapter`` for URLs whose backend name is ``backend``."""
    if not isinstance(adapter, DialectAdapter):
        raise InvalidSpecError("adapter", "does not implement the DialectAdapter protocol")
    _ADAPTERS[backend] = adapter


def adapter_for(backend: str) -> DialectAdapter:
    """The adapter for a backend; a generic one (no catalog, no schema) otherwise."""
    return _ADAPTERS.get(backend, _GENERIC)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _libpq_escape(value: str) -> str:
    # libpq splits ``options`` on whitespace; a backslash keeps the next char literal.
    return value.replace("\\", "\\\\").replace(" ", "\\ ")
