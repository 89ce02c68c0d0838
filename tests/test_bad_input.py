"""Every bad input of issue 3: the exact error, the field named, no secret, service goes on."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from enginehouse import DatabaseSpec, EngineManager, Mode
from enginehouse.compat import postgres_uri
from enginehouse.errors import (
    ConfigurationError,
    DriverNotInstalledError,
    EngineCreationError,
    EngineManagerError,
    InvalidSpecError,
    ManagerShutDownError,
)

pytestmark = [
    pytest.mark.usefixtures("sqlite_files_allowed"),
    pytest.mark.services("postgres", "mariadb"),
]

SECRET = "s3cr3t-pw"
PG = postgres_uri(f"postgres:{SECRET}@127.0.0.1:5432/test")


@pytest.fixture
def good(tmp_path: Path) -> DatabaseSpec:
    return DatabaseSpec(id="good", uri=f"sqlite:///{tmp_path / 'good.db'}")


def still_serves(manager: EngineManager, good: DatabaseSpec) -> None:
    with manager.connect(good) as conn:
        assert conn.execute(text("select 1")).scalar() == 1


def spec_error(data: dict[str, Any]) -> InvalidSpecError:
    with pytest.raises(InvalidSpecError) as info:
        DatabaseSpec.model_validate(data)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, EngineManagerError)
    return info.value


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"uri": "not a url"}, "uri", "not a valid SQLAlchemy URL"),
        ({"uri": f"nosuchdb://u:{SECRET}@h/db"}, "uri", "unknown dialect"),
        ({"uri": PG, "extra": "[1, 2]"}, "extra", "JSON object"),
        ({"uri": PG, "extra": [1, 2]}, "extra", "JSON object"),
        ({"uri": PG, "extra": "{not json"}, "extra", "not valid JSON"),
        ({"uri": PG, "extra": 42}, "extra", "JSON object"),
        (
            {"uri": PG, "extra": {"engine_params": {"poolclass": "lake"}}},
            "extra.engine_params.poolclass",
            "unknown pool class",
        ),
        (
            {"uri": PG, "extra": {"engine_params": {"pool_size": -1}}},
            "extra.engine_params.pool_size",
            ">= 0",
        ),
        (
            {"uri": PG, "extra": {"engine_params": {"max_overflow": -2}}},
            "extra.engine_params.max_overflow",
            ">= -1",
        ),
        (
            {"uri": PG, "extra": '{"engine_params": {"pool_size": -3}}'},
            "extra.engine_params.pool_size",
            ">= 0",
        ),
    ],
)
def test_invalid_spec_names_the_field(
    data: dict[str, Any], field: str, words: str, manager: EngineManager, good: DatabaseSpec
) -> None:
    error = spec_error({"id": 1, **data})
    assert error.field == field
    assert words in str(error)
    still_serves(manager, good)


def test_max_overflow_minus_one_is_fine() -> None:
    spec = DatabaseSpec(id=1, uri=PG, extra={"engine_params": {"max_overflow": -1}})
    assert spec.engine_params == {"max_overflow": -1}


def test_driver_not_installed(manager: EngineManager, good: DatabaseSpec) -> None:
    with pytest.raises(ModuleNotFoundError):  # the test means something only without pg8000
        __import__("pg8000")
    spec = DatabaseSpec(id=2, uri=f"postgresql+pg8000://postgres:{SECRET}@127.0.0.1/test")
    with pytest.raises(DriverNotInstalledError) as info:
        manager.get(spec)
    assert "pg8000" in str(info.value) and "create_engine" in str(info.value)
    assert SECRET not in str(info.value)
    assert info.value.database_id == 2
    assert manager.stats().engine_count == 0
    still_serves(manager, good)


def test_driver_not_installed_in_new_mode(new_manager: EngineManager, good: DatabaseSpec) -> None:
    spec = DatabaseSpec(id=2, uri=f"postgresql+pg8000://postgres:{SECRET}@127.0.0.1/test")
    with pytest.raises(DriverNotInstalledError):
        new_manager.get(spec)
    still_serves(new_manager, good)


def test_schema_on_sqlite(manager: EngineManager, good: DatabaseSpec) -> None:
    with pytest.raises(InvalidSpecError) as info:
        manager.get(good, schema="sales")
    assert info.value.field == "schema"
    still_serves(manager, good)


def test_empty_schema_string(manager: EngineManager) -> None:
    with pytest.raises(InvalidSpecError) as info:
        manager.get(DatabaseSpec(id=1, uri=PG), schema="")
    assert info.value.field == "schema"


def test_not_a_spec(manager: EngineManager, good: DatabaseSpec) -> None:
    with pytest.raises(InvalidSpecError) as info:
        manager.get({"id": 1, "uri": "sqlite://"})
    assert info.value.field == "database"
    still_serves(manager, good)


def test_wrong_password_fails_at_connect_without_the_password(
    manager: EngineManager, good: DatabaseSpec
) -> None:
    spec = DatabaseSpec(id=3, uri=f"mysql+pymysql://root:{SECRET}@127.0.0.1:3306/test")
    engine = manager.get(spec)
    with pytest.raises(OperationalError) as info, engine.connect():
        pass
    assert SECRET not in str(info.value)
    still_serves(manager, good)


def test_mutator_that_raises(tmp_path: Path, good: DatabaseSpec) -> None:
    def broken(url: Any, kwargs: Any, *, user: Any, source: Any) -> Any:
        raise RuntimeError(f"leaks {url.password}")

    def wrong_shape(url: Any, kwargs: Any, *, user: Any, source: Any) -> Any:
        return "nope"

    spec = DatabaseSpec(id=4, uri=f"sqlite:///{tmp_path / 'm.db'}")
    with EngineManager(connection_mutator=broken, cleanup_interval=60) as manager:
        with pytest.raises(EngineCreationError) as info:
            manager.get(spec)
        assert info.value.step == "connection_mutator"
        assert "RuntimeError" in str(info.value)
    with EngineManager(connection_mutator=wrong_shape, cleanup_interval=60) as manager:
        with pytest.raises(InvalidSpecError) as bad:
            manager.get(spec)
        assert bad.value.field == "connection_mutator"


def test_call_after_shutdown(good: DatabaseSpec) -> None:
    manager = EngineManager(cleanup_interval=60)
    manager.get(good)
    manager.shutdown()
    manager.shutdown()  # idempotent
    assert manager.closed
    calls: list[Callable[[], object]] = [
        lambda: manager.get(good),
        lambda: manager.dispose(good.id),
        manager.stats,
        manager.sweep,
    ]
    for call in calls:
        with pytest.raises(ManagerShutDownError):
            call()
    with pytest.raises(ManagerShutDownError), manager.connect(good):
        pass


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"idle_timeout": -1}, "idle_timeout"),
        ({"max_engines": 0}, "max_engines"),
        ({"cleanup_interval": 0}, "cleanup_interval"),
        ({"ask_timeout": -5}, "ask_timeout"),
        ({"mode": "sometimes"}, "mode"),
        ({"restart_max": -1}, "restart_max"),
        ({"connection_mutator": "no.such.module.func"}, "connection_mutator"),
        ({"no_such_setting": 1}, "no_such_setting"),
    ],
)
def test_invalid_settings(values: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        EngineManager(**values)
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_invalid_setting_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINEHOUSE_IDLE_TIMEOUT", "-3")
    with pytest.raises(ConfigurationError) as info:
        EngineManager()
    assert info.value.field == "idle_timeout"


def test_mode_from_environment(monkeypatch: pytest.MonkeyPatch, good: DatabaseSpec) -> None:
    monkeypatch.setenv("ENGINEHOUSE_MODE", "new")
    with EngineManager(cleanup_interval=60) as manager:
        assert manager.settings.mode is Mode.NEW
        assert manager.get(good) is not manager.get(good)
    with EngineManager(mode="singleton", cleanup_interval=60) as manager:  # keywords win
        assert manager.get(good) is manager.get(good)


def test_mode_accepts_the_enum() -> None:
    with EngineManager(mode=Mode.NEW, cleanup_interval=60) as manager:
        assert manager.stats().mode is Mode.NEW


def test_settings_object_and_keywords_together() -> None:
    from enginehouse.settings import ManagerSettings

    with pytest.raises(EngineManagerError):
        EngineManager(ManagerSettings.build(), mode="new")


# -- issue 13 item 2: non-finite and out-of-range numbers name their field -----------------

NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("number", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "field",
    ["pool_size", "max_overflow", "pool_timeout", "pool_recycle", "connect_args.connect_timeout"],
)
def test_non_finite_engine_param_is_refused(
    number: float, field: str, manager: EngineManager, pg_spec: DatabaseSpec
) -> None:
    params: dict[str, Any] = {}
    if field.startswith("connect_args."):
        params["connect_args"] = {field.split(".", 1)[1]: number}
    else:
        params[field] = number
    error = spec_error({"id": 1, "uri": PG, "extra": {"engine_params": params}})
    assert error.field == f"extra.engine_params.{field}"
    still_serves(manager, pg_spec)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"engine_params": {"pool_timeout": NaN}}', "extra.engine_params.pool_timeout"),
        ('{"engine_params": {"pool_size": Infinity}}', "extra.engine_params.pool_size"),
        ('{"engine_params": {"pool_recycle": -Infinity}}', "extra.engine_params.pool_recycle"),
        ('{"max_connections": NaN}', "extra.max_connections"),
        ('{"max_connections": 1e400}', "extra.max_connections"),
        ('{"metadata_params": {"x": [1, NaN]}}', "extra.metadata_params.x[1]"),
        ('{"engine_params": {"pool_size": 10000000000000000000}}', "extra.engine_params.pool_size"),
        ('{"max_connections": 100000000000000000000000}', "extra.max_connections"),
        ('{"engine_params": {"max_overflow": 1000001}}', "extra.engine_params.max_overflow"),
        ('{"engine_params": {"pool_timeout": 1e12}}', "extra.engine_params.pool_timeout"),
        ('{"engine_params": {"pool_size": 2.5}}', "extra.engine_params.pool_size"),
        ('{"x": 1' + "0" * 5000 + "}", "extra"),  # past Python's integer digit limit
        ('{"x": ' + "[" * 40 + "]" * 40 + "}", "extra"),  # nested deeper than 32
        ("[" * 100_000, "extra"),  # json.loads would raise RecursionError
    ],
)
def test_bad_numbers_in_extra_json_text_name_the_field(
    text: str, field: str, manager: EngineManager, pg_spec: DatabaseSpec
) -> None:
    error = spec_error({"id": 1, "uri": PG, "extra": text})
    assert error.field == field
    still_serves(manager, pg_spec)


@pytest.mark.parametrize("number", [*NON_FINITE, 10**30, 0, True])
def test_bad_max_connections_is_refused(number: object) -> None:
    error = spec_error({"id": 1, "uri": PG, "extra": {"max_connections": number}})
    assert error.field == "extra.max_connections"


@pytest.mark.parametrize(
    "encrypted",
    [
        '{"engine_params": {"pool_timeout": NaN}}',
        {"engine_params": {"connect_args": {SECRET: float("inf")}}},
        {"engine_params": {"connect_args": {"password": object()}}},
    ],
)
def test_bad_numbers_in_encrypted_extra_never_name_a_key(encrypted: object) -> None:
    error = spec_error({"id": 1, "uri": PG, "encrypted_extra": encrypted})
    assert error.field == "encrypted_extra"


def test_out_of_range_pool_timeout_in_encrypted_extra_names_the_field(
    manager: EngineManager,
) -> None:
    spec = DatabaseSpec(
        id=1, uri=PG, encrypted_extra={"engine_params": {"pool_timeout": 10**9}}
    )
    with pytest.raises(InvalidSpecError) as info:
        manager.get(spec)
    assert info.value.field == "encrypted_extra.engine_params.pool_timeout"


def test_in_range_numbers_still_work(manager: EngineManager) -> None:
    spec = DatabaseSpec(
        id="bounds",
        uri=PG,
        extra='{"engine_params": {"pool_size": 2, "max_overflow": -1, "pool_timeout": 2.5,'
        ' "pool_recycle": 3600.0, "connect_args": {"connect_timeout": 5}}, "max_connections": 4}',
    )
    with manager.connect(spec) as conn:
        assert conn.execute(text("select 1")).scalar() == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("idle_timeout", float("inf")),
        ("idle_timeout", float("nan")),
        ("cleanup_interval", float("inf")),
        ("ask_timeout", float("nan")),
        ("ask_timeout", 1e300),
        ("restart_period", float("inf")),
        ("restart_backoff", float("nan")),
        ("restart_backoff_max", float("inf")),
        ("tunnel_idle_timeout", float("inf")),
        ("tunnel_connect_timeout", float("-inf")),
        ("fleet_lease_ttl", float("nan")),
        ("max_engines", 10**40),
        ("restart_max", 10**40),
        ("default_max_connections", 10**40),
        ("max_tunnels_per_bastion", 10**40),
        ("max_engines", float("inf")),
    ],
)
def test_non_finite_and_huge_settings_are_refused(name: str, value: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        EngineManager(**{name: value})
    assert info.value.field == name


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("ENGINEHOUSE_ASK_TIMEOUT", "Infinity", "ask_timeout"),
        ("ENGINEHOUSE_IDLE_TIMEOUT", "nan", "idle_timeout"),
        ("ENGINEHOUSE_CLEANUP_INTERVAL", "inf", "cleanup_interval"),
        ("ENGINEHOUSE_MAX_ENGINES", "9" * 50, "max_engines"),
        ("ENGINEHOUSE_DENIED_DIALECTS", "not json", "denied_dialects"),
    ],
)
def test_bad_numbers_from_the_environment_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as info:
        EngineManager()
    assert info.value.field == field


@pytest.mark.parametrize(
    ("tunnel", "field"),
    [
        ({"server_address": "", "username": "u", "password": SECRET}, "ssh_tunnel.server_address"),
        (
            {"server_address": "h", "username": "u", "password": SECRET, "server_port": math.nan},
            "ssh_tunnel.server_port",
        ),
        (
            {"server_address": "h", "username": "u", "password": SECRET, "server_port": 10**30},
            "ssh_tunnel.server_port",
        ),
    ],
)
def test_nested_tunnel_error_names_the_path(tunnel: dict[str, Any], field: str) -> None:
    """Found by tests/test_fuzz_specs.py: a nested spec's error named only its own field."""
    error = spec_error({"id": 1, "uri": PG, "ssh_tunnel": tunnel})
    assert error.field == field
