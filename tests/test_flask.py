"""The Flask extension under the Flask test client, with real PostgreSQL behind it."""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from conftest import PG_URI
from flask import Flask, g, jsonify
from secret_scan import assert_no_secret, register_secret
from sqlalchemy import text

from enginehouse.errors import ConfigurationError
from enginehouse.integrations.flask import (
    EXTENSION_KEY,
    EngineManagerExtension,
    get_sqla_engine,
    to_spec,
)
from enginehouse.integrations.metrics import disable_pool_events
from enginehouse.settings import Mode

pytestmark = pytest.mark.services("postgres")

PG = PG_URI
PASSWORD = "s3cr3t-pw"
register_secret(PASSWORD)


@pytest.fixture(autouse=True)
def _pool_events_off_afterwards() -> Iterator[None]:
    """Metrics enable process-wide checkout timers: switch them off for the next tests."""
    yield
    disable_pool_events()


@dataclass
class SupersetDatabase:
    """The attributes Superset's ``Database`` model offers (the extension duck-types them)."""

    id: int
    sqlalchemy_uri_decrypted: str
    extra: str = "{}"
    impersonate_user: bool = False
    encrypted_extra: str | None = None


class EngineModes(enum.Enum):  # as in Superset's config
    NEW = enum.auto()
    SINGLETON = enum.auto()


WAREHOUSE = SupersetDatabase(
    id=11,
    sqlalchemy_uri_decrypted=PG.replace("://postgres@", f"://postgres:{PASSWORD}@"),
    extra=json.dumps({"engine_params": {"pool_size": 2}}),
)
SEEN: list[tuple[Any, ...]] = []


def superset_mutator(uri: Any, params: dict[str, Any], username: Any, sm: Any, source: Any) -> Any:
    """A DB_CONNECTION_MUTATOR with Superset's positional signature."""
    SEEN.append((username, sm, source))
    connect_args = dict(params.get("connect_args", {}))
    connect_args["application_name"] = f"flask-{source}"
    return uri, {**params, "connect_args": connect_args}


def make_app(**config: Any) -> Flask:
    app = Flask("enginehouse-test")
    defaults = {
        "ENGINE_MANAGER_MODE": EngineModes.SINGLETON,
        "ENGINE_MANAGER_CLEANUP_INTERVAL": timedelta(minutes=5),
    }
    app.config.update({**defaults, **config})

    @app.before_request
    def login() -> None:
        g.user = type("User", (), {"username": "alice"})()

    @app.route("/query/<source>")
    def query(source: str) -> Any:
        with (
            get_sqla_engine(WAREHOUSE, schema="public", source=source) as engine,
            engine.connect() as connection,
        ):
            row = connection.execute(
                text("select current_setting('application_name'), pg_backend_pid()")
            ).one()
        return jsonify(application=row[0], pid=row[1], engine=id(engine))

    return app


@pytest.fixture
def app() -> Iterator[Flask]:
    app = make_app(DB_CONNECTION_MUTATOR=superset_mutator, ENGINEHOUSE_IDLE_TIMEOUT=120)
    extension = EngineManagerExtension(app)
    yield app
    with app.app_context():
        extension.shutdown()


def test_config_keys_are_mapped(app: Flask) -> None:
    state = app.extensions[EXTENSION_KEY]
    settings = state.settings
    assert settings.mode is Mode.SINGLETON
    assert settings.cleanup_interval == 300
    assert settings.idle_timeout == 120
    assert settings.connection_mutator is not None
    assert state.manager is not None and not state.manager.closed  # auto start is the default


def test_requests_share_one_engine_and_the_mutator_sees_superset_arguments(app: Flask) -> None:
    SEEN.clear()
    client = app.test_client()
    first = client.get("/query/sql_lab").get_json()
    second = client.get("/query/sql_lab").get_json()
    chart = client.get("/query/chart").get_json()
    assert first["application"] == "flask-sql_lab"
    assert chart["application"] == "flask-chart"
    assert first["engine"] == second["engine"] != chart["engine"]
    assert ("alice", None, "sql_lab") in SEEN  # username from g.user, no appbuilder here
    with app.app_context():
        stats = app.extensions[EXTENSION_KEY].manager.stats()
    assert stats.engine_count == 2
    assert {e.database_id for e in stats.engines} == {11}
    assert all(PASSWORD not in e.url for e in stats.engines)


def test_shutdown_and_restart_on_next_use(app: Flask) -> None:
    state = app.extensions[EXTENSION_KEY]
    first = state.manager
    with app.app_context():
        EngineManagerExtension().shutdown()
    assert first.closed
    assert app.test_client().get("/query/dashboard").status_code == 200
    assert state.manager is not first and not state.manager.closed


def test_auto_start_off_starts_on_first_use() -> None:
    app = make_app(ENGINE_MANAGER_AUTO_START_CLEANUP=False, ENGINE_MANAGER_MODE="new")
    extension = EngineManagerExtension()
    extension.init_app(app)
    state = app.extensions[EXTENSION_KEY]
    assert state.manager is None
    try:
        response = app.test_client().get("/query/sql_lab")
        assert response.status_code == 200
        assert state.manager is not None
        assert state.settings.mode is Mode.NEW
        assert state.manager.stats().uncached_created == 1
    finally:
        with app.app_context():
            extension.shutdown()


def test_init_twice_is_refused(app: Flask) -> None:
    with pytest.raises(ConfigurationError, match="already initialised"):
        EngineManagerExtension(app)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"ENGINEHOUSE_NO_SUCH_SETTING": 1}, "ENGINEHOUSE_NO_SUCH_SETTING"),
        ({"ENGINE_MANAGER_MODE": "bogus"}, "mode"),
        ({"ENGINEHOUSE_IDLE_TIMEOUT": -1}, "idle_timeout"),
        ({"ENGINE_MANAGER_CLEANUP_INTERVAL": timedelta(seconds=-5)}, "cleanup_interval"),
    ],
)
def test_bad_config_names_the_key(config: dict[str, Any], field: str) -> None:
    app = make_app(**config)
    with pytest.raises(ConfigurationError) as caught:
        EngineManagerExtension(app)
    assert caught.value.field == field
    assert_no_secret(caught.value)
    assert EXTENSION_KEY not in app.extensions


def test_superset_models_become_masked_specs() -> None:
    tunnel = type(
        "SSHTunnel",
        (),
        {"server_address": "10.0.0.5", "server_port": 22, "username": "ops", "password": PASSWORD},
    )()
    spec = to_spec(WAREHOUSE, ssh_tunnel=tunnel, strict_host_keys=True)
    assert spec.id == 11
    assert spec.password is not None and spec.password.get_secret_value() == PASSWORD
    assert spec.ssh_tunnel is not None and spec.ssh_tunnel.host_key_policy == "strict"
    assert spec.engine_params == {"pool_size": 2}
    assert to_spec(WAREHOUSE, ssh_tunnel=tunnel, strict_host_keys=True) is spec  # cached
    assert_no_secret(repr(spec))
    assert_no_secret(spec.uri)


def test_outside_an_app_context_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="app context"):
        _ = EngineManagerExtension().manager


def test_metrics_port_and_superset_call_shape() -> None:
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = make_app(ENGINEHOUSE_METRICS_PORT=port)

    @app.route("/superset-shaped")
    def superset_shaped() -> Any:
        # the exact call shape of Superset's Database.get_sqla_engine
        with get_sqla_engine(
            WAREHOUSE, catalog=None, schema="public", nullpool=True, source=None
        ) as engine:
            return jsonify(url=engine.url.render_as_string(hide_password=True))

    extension = EngineManagerExtension(app)
    try:
        assert app.test_client().get("/superset-shaped").status_code == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as page:
            body = page.read().decode()
        assert 'enginehouse_engines{database="11"} 1.0' in body
        assert_no_secret(body, what="metrics page")
    finally:
        with app.app_context():
            extension.shutdown()


def test_the_worked_example_in_docs_flask_md_runs() -> None:
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    blocks = re.findall(r"```python\n(.*?)```", (root / "docs" / "flask.md").read_text(), re.S)
    example = next(block for block in blocks if "class Database" in block)
    example = example.replace("postgresql+psycopg://postgres:s3cret@127.0.0.1:5432/test", PG)
    result = subprocess.run(
        [sys.executable, "-c", example],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    charts, engines = result.stdout.strip().splitlines()
    assert len(set(re.findall(r"'backend': (\d+)", charts))) == 1  # one pooled connection reused
    assert "'engines': 1" in engines


def test_concurrent_first_uses_start_one_manager() -> None:
    import threading

    app = make_app(ENGINE_MANAGER_AUTO_START_CLEANUP=False)
    extension = EngineManagerExtension(app)
    barrier = threading.Barrier(16)
    seen: list[Any] = []

    def first_use() -> None:
        with app.app_context():
            barrier.wait(timeout=30)
            seen.append(extension.manager)

    threads = [threading.Thread(target=first_use) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert len(seen) == 16
        assert len({id(manager) for manager in seen}) == 1
        seen[0].shutdown()  # closed behind the extension's back: the next use replaces it
        with app.app_context():
            replacement = extension.manager
        assert replacement is not seen[0] and not replacement.closed
    finally:
        with app.app_context():
            extension.shutdown()
