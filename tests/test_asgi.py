"""The ASGI lifespan under FastAPI's TestClient (httpx), with real PostgreSQL."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import pytest
from conftest import PG_URI
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient
from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.errors import ConfigurationError
from enginehouse.integrations.asgi import engine_manager, lifespan, make_lifespan
from enginehouse.integrations.metrics import disable_pool_events

pytestmark = pytest.mark.services("postgres")

PG = PG_URI
SPEC = DatabaseSpec(id=21, uri=PG, extra={"engine_params": {"pool_size": 2}})


@pytest.fixture(autouse=True)
def _pool_events_off_afterwards() -> Iterator[None]:
    """Metrics enable process-wide checkout timers: switch them off for the next tests."""
    yield
    disable_pool_events()


def make_api(life: Any) -> FastAPI:
    api = FastAPI(lifespan=life)

    @api.get("/pid")
    def pid(manager: Annotated[EngineManager, Depends(engine_manager)]) -> dict[str, Any]:
        with manager.connect(SPEC) as connection:
            backend = connection.execute(text("select pg_backend_pid()")).scalar_one()
        return {"pid": backend, "manager": id(manager), "mode": manager.settings.mode.value}

    @api.get("/state")
    def state(request: Request) -> dict[str, Any]:
        return {"manager": id(request.state.engine_manager), "inner": request.state.inner}

    return api


def test_default_lifespan_starts_and_stops_the_manager() -> None:
    api = make_api(lifespan)
    with TestClient(api) as client:
        manager = api.state.engine_manager
        assert isinstance(manager, EngineManager) and not manager.closed
        first = client.get("/pid").json()
        second = client.get("/pid").json()
        assert first["manager"] == second["manager"] == id(manager)
        assert first["pid"] > 0
        stats = manager.stats()
        assert stats.engine_count == 1
        assert stats.engines[0].database_id == 21
    assert manager.closed


def test_make_lifespan_with_settings_inner_lifespan_and_metrics() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def inner(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        events.append("inner up")
        yield {"inner": "ready"}
        events.append("inner down")

    with socket_port() as port:
        api = make_api(make_lifespan(mode="new", inner=inner, metrics_port=port))
        with TestClient(api) as client:
            assert client.get("/pid").json()["mode"] == "new"
            state = client.get("/state").json()
            assert state == {"manager": id(api.state.engine_manager), "inner": "ready"}
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as page:
                body = page.read().decode()
            assert "enginehouse_engine_uncached_creations_total 1.0" in body
            assert events == ["inner up"]
        assert events == ["inner up", "inner down"]
        assert api.state.engine_manager.closed


def test_bad_settings_fail_at_definition() -> None:
    with pytest.raises(ConfigurationError) as caught:
        make_lifespan(idle_timeout=-1)
    assert caught.value.field == "idle_timeout"


def test_dependency_without_lifespan_is_a_clear_error() -> None:
    api = make_api(None)
    with (
        TestClient(api, raise_server_exceptions=True) as client,
        pytest.raises(RuntimeError, match=r"lifespan=enginehouse\.integrations\.asgi\.lifespan"),
    ):
        client.get("/pid")


class socket_port:
    """A free loopback port, found by binding port 0."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        return None
