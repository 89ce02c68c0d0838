"""The URI validator: targets a server refuses before it builds an engine.

Runs on a miss (and on every NEW-mode request) with the final URL, after the
dialect adapter and the connection mutator, so a mutator cannot route around
it. Rules (``forbid_unsafe_uris``, on by default):

- ``denied-dialect``: the URL's backend or drivername is in ``denied_dialects``;
- ``sqlite-file``: a SQLite file would be opened on this machine's disk;
- ``sqlite-memory``: in-memory SQLite, unless ``allow_sqlite_memory``.

Then the ``uri_validator`` setting, if any, may refuse more.
"""

from __future__ import annotations

from sqlalchemy.engine import URL

from enginehouse.errors import EngineManagerError, UnsafeURIError
from enginehouse.settings import ManagerSettings
from enginehouse.specs import DatabaseSpec

_TRUE = ("true", "1", "yes", "on")


def check_uri(url: URL, database: DatabaseSpec, settings: ManagerSettings) -> None:
    """Raise :class:`UnsafeURIError` (naming the rule) if ``url`` may not be used."""
    if settings.forbid_unsafe_uris:
        refuse_unsafe(url, settings)
    validator = settings.uri_validator
    if validator is None:
        return
    try:
        validator(url, database)
    except EngineManagerError:
        raise
    except Exception as exc:
        # Its message may quote the URL: keep only the type.
        reason = f"uri_validator raised {type(exc).__name__}"
        raise UnsafeURIError("uri-validator", reason) from None


def refuse_unsafe(url: URL, settings: ManagerSettings) -> None:
    """The built-in rules (see the module docstring)."""
    backend = url.get_backend_name()
    denied = settings.denied_dialects
    if backend in denied or url.drivername in denied:
        raise UnsafeURIError("denied-dialect", f"dialect {url.drivername!r} is in denied_dialects")
    if backend != "sqlite":
        return
    if not is_sqlite_memory(url):
        raise UnsafeURIError(
            "sqlite-file", "a SQLite file on this server's disk (set forbid_unsafe_uris=False)"
        )
    if not settings.allow_sqlite_memory:
        raise UnsafeURIError("sqlite-memory", "in-memory SQLite needs allow_sqlite_memory=True")


def is_sqlite_memory(url: URL) -> bool:
    """Whether a SQLite URL names an in-memory database rather than a file."""
    database = url.database or ""
    if database in ("", ":memory:"):
        return True
    as_uri = str(url.query.get("uri", "")).lower() in _TRUE
    if as_uri and database.startswith("file:"):
        return database.startswith("file::memory:") or url.query.get("mode") == "memory"
    return False
