"""``engines``: the process-wide default manager, started on first use.

``engines.configure(...)`` sets its settings; a manager already running is
shut down and the next call starts one with the new settings.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from typing import Any, TypeVar

from pydantic import SecretStr
from sqlalchemy.engine import Connection, Engine

from enginehouse.errors import ManagerShutDownError
from enginehouse.manager import EngineManager
from enginehouse.settings import ManagerSettings
from enginehouse.single_flight import SingleFlight
from enginehouse.specs import DatabaseSpec
from enginehouse.stats import ManagerStats

T = TypeVar("T")
_ATTEMPTS = 3  # starts tried when configure() keeps racing them


class DefaultEngines:
    """A lazily started :class:`EngineManager` with the same methods."""

    def __init__(self) -> None:
        self._settings: ManagerSettings | None = None
        self._manager: EngineManager | None = None
        self._version = 0
        self._starts: SingleFlight[EngineManager] = SingleFlight()

    def configure(self, **values: Any) -> None:
        """Validate and keep settings for the default manager (restarting it if running)."""
        self._settings = ManagerSettings.build(**values)
        self._retire()

    def manager(self) -> EngineManager:
        """The running default manager, started now if need be."""
        for _attempt in range(_ATTEMPTS):
            manager = self._manager
            if manager is not None and not manager.closed:
                return manager
            if manager is not None:
                self._retire()  # shut down by a direct call: the next one starts anew
            version = self._version
            timeout = self._settings.ask_timeout if self._settings else 30.0
            manager = self._starts.run(version, partial(self._create, version), timeout)
            if version == self._version and not manager.closed:
                return manager
            # configure() ran while it started: it has the old settings and no owner.
            manager.shutdown()
        raise ManagerShutDownError("the default manager was reconfigured during each start")

    def _call(self, call: Callable[[EngineManager], T]) -> T:
        """``call(manager)``, once more on the new manager if a configure() retired it."""
        manager = self.manager()
        try:
            return call(manager)
        except ManagerShutDownError:
            if self._manager is manager:
                raise
            return call(self.manager())

    def get(
        self,
        database: DatabaseSpec,
        *,
        catalog: str | None = None,
        schema: str | None = None,
        source: str | None = None,
        user: str | None = None,
        access_token: str | SecretStr | None = None,
    ) -> Engine:
        manager = self._manager
        if manager is not None:  # the hot path: no closure, no retry wrapper, no keywords
            try:
                return manager._engine(database, catalog, schema, source, user, access_token)
            except ManagerShutDownError:
                pass  # shut down or retired: _call starts (or finds) the next one
        return self._call(
            lambda manager: manager._engine(database, catalog, schema, source, user, access_token)
        )

    def connect(
        self,
        database: DatabaseSpec,
        *,
        catalog: str | None = None,
        schema: str | None = None,
        source: str | None = None,
        user: str | None = None,
        access_token: str | SecretStr | None = None,
    ) -> AbstractContextManager[Connection]:
        """The running manager's checkout; with none running, one starts at ``__enter__``."""
        manager = self._manager
        if manager is None or manager._closed:
            request = {
                "catalog": catalog, "schema": schema, "source": source, "user": user,
                "access_token": access_token,
            }  # fmt: skip
            return _DefaultCheckout(self, database, request)
        checkout = manager._checkout
        if checkout is None:  # an engine_context to enter
            return manager.connect(
                database,
                catalog=catalog,
                schema=schema,
                source=source,
                user=user,
                access_token=access_token,
            )
        # The hot path: the running manager's own checkout, built here (one call less).
        if source is None and user is None and access_token is None:
            return checkout((manager, database, catalog, schema, None))
        return checkout((manager, database, catalog, schema, (source, user, access_token)))

    def dispose(self, database_id: int | str) -> int:
        return self._call(lambda manager: manager.dispose(database_id))

    def stats(self) -> ManagerStats:
        return self._call(lambda manager: manager.stats())

    def sweep(self) -> None:
        self._call(lambda manager: manager.sweep())

    def shutdown(self) -> None:
        """Stop the default manager; the next call starts a new one."""
        self._retire()

    def _create(self, version: int) -> EngineManager:
        manager = EngineManager(settings=self._settings or ManagerSettings.build())
        if version == self._version:
            self._manager = manager
        return manager

    def _retire(self) -> None:
        old, self._manager = self._manager, None
        self._version += 1
        if old is not None:
            old.shutdown()


class _DefaultCheckout:
    """What ``engines.connect()`` returns before any manager runs: one starts at ``__enter__``."""

    __slots__ = ("_database", "_default", "_inner", "_request")

    def __init__(
        self, default: DefaultEngines, database: DatabaseSpec, request: dict[str, Any]
    ) -> None:
        self._default = default
        self._database = database
        self._request = request

    def __enter__(self) -> Connection:
        self._inner = self._default.manager().connect(self._database, **self._request)
        return self._inner.__enter__()

    def __exit__(self, *exc_info: Any) -> None:
        self._inner.__exit__(*exc_info)


engines = DefaultEngines()
