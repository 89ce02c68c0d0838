"""FastAPI / Starlette lifespan: a manager that starts and stops with the ASGI app.

    from fastapi import Depends, FastAPI
    from enginehouse.integrations.asgi import engine_manager, lifespan

    api = FastAPI(lifespan=lifespan)                 # settings from ENGINEHOUSE_* variables

    @api.get("/rows")
    def rows(manager: Annotated[EngineManager, Depends(engine_manager)]) -> ...:
        with manager.connect(spec) as connection: ...

``make_lifespan(mode="singleton", ...)`` takes settings (and an inner
lifespan to wrap). Engines are synchronous: use them from ``def``
endpoints (run in the thread pool), not from ``async def`` ones.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from starlette.requests import HTTPConnection

from enginehouse.manager import EngineManager
from enginehouse.settings import ManagerSettings

log = logging.getLogger("enginehouse.asgi")

STATE_KEY = "engine_manager"
"""Name of the manager in the lifespan state (``request.state.engine_manager``)."""

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]


def make_lifespan(
    *,
    settings: ManagerSettings | None = None,
    inner: Lifespan | None = None,
    metrics_port: int | None = None,
    **values: Any,
) -> Lifespan:
    """A lifespan starting an :class:`EngineManager` with these settings.

    ``inner`` is another lifespan run inside ours (its state is merged);
    ``metrics_port`` also serves ``/metrics`` on 127.0.0.1 for the app's life.
    """
    built = settings if settings is not None else ManagerSettings.build(**values)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        manager = EngineManager(settings=built)
        server = None
        try:
            if metrics_port is not None:
                from enginehouse.integrations.metrics import start_metrics_server

                server = start_metrics_server(manager, port=metrics_port)
            app_state = getattr(app, "state", None)
            if app_state is not None:
                setattr(app_state, STATE_KEY, manager)
            log.info("engine manager started with the ASGI app (%s mode)", built.mode.value)
            state: dict[str, Any] = {STATE_KEY: manager}
            if inner is None:
                yield state
            else:
                async with inner(app) as inner_state:
                    yield {**(inner_state or {}), **state}
        finally:
            await _in_thread(server.stop if server is not None else None)
            # shutdown joins actor threads: keep the event loop free meanwhile
            await _in_thread(manager.shutdown)
            log.info("engine manager stopped with the ASGI app")

    return lifespan


def lifespan(app: Any) -> AbstractAsyncContextManager[dict[str, Any]]:
    """``FastAPI(lifespan=lifespan)``: settings from ``ENGINEHOUSE_*`` variables."""
    return make_lifespan()(app)


def engine_manager(request: HTTPConnection) -> EngineManager:
    """FastAPI dependency: ``manager: EngineManager = Depends(engine_manager)``."""
    manager = getattr(request.state, STATE_KEY, None)
    if manager is None:
        manager = getattr(request.app.state, STATE_KEY, None)
    if not isinstance(manager, EngineManager):
        raise RuntimeError(
            "no engine manager: create the app with "
            "lifespan=enginehouse.integrations.asgi.lifespan"
        )
    return manager


async def _in_thread(function: Callable[[], None] | None) -> None:
    if function is None:
        return
    import anyio.to_thread  # starlette's own dependency

    await anyio.to_thread.run_sync(function)
