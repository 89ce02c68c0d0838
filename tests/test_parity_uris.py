"""The URI validator: built-in rules for servers (named in the error) and a custom hook."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from conftest import PG_URI
from secret_scan import assert_no_secret
from sqlalchemy import text
from sqlalchemy.engine import URL

from enginehouse import DatabaseSpec, EngineManager, ManagerSettings
from enginehouse.errors import InvalidSpecError, UnsafeURIError
from enginehouse.safety import is_sqlite_memory

pytestmark = pytest.mark.services("postgres", "mariadb")

MYSQL_URI = os.environ.get("ENGINEHOUSE_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")


def refused(manager: EngineManager, spec: DatabaseSpec, **request: Any) -> UnsafeURIError:
    with pytest.raises(UnsafeURIError) as caught:
        manager.get(spec, **request)
    assert caught.value.field == "uri" and isinstance(caught.value, InvalidSpecError)
    assert caught.value.rule in str(caught.value)
    return caught.value


def select_one(manager: EngineManager, spec: DatabaseSpec) -> object:
    with manager.connect(spec) as conn:
        return conn.execute(text("SELECT 1")).scalar()


def test_safe_by_default() -> None:
    settings = ManagerSettings.build()
    assert settings.forbid_unsafe_uris is True
    assert settings.allow_sqlite_memory is False


@pytest.mark.parametrize("mode", ["singleton", "new"])
def test_sqlite_file_is_refused_and_never_created(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "server-disk.db"
    spec = DatabaseSpec(id=1, uri=f"sqlite:///{path}")
    with EngineManager(mode=mode, cleanup_interval=60) as manager:
        error = refused(manager, spec)
        with pytest.raises(UnsafeURIError), manager.connect(spec):
            pass
        assert manager.stats().created + manager.stats().uncached_created == 0
    assert error.rule == "sqlite-file"
    assert not path.exists()


@pytest.mark.parametrize("uri", ["sqlite://", "sqlite:///:memory:",
                                 "sqlite:///file:eh_mem?mode=memory&cache=shared&uri=true"])
def test_sqlite_memory_needs_the_opt_in(uri: str) -> None:
    spec = DatabaseSpec(id=2, uri=uri, extra={"engine_params": {"poolclass": "singleton"}})
    with EngineManager(cleanup_interval=60) as manager:
        assert refused(manager, spec).rule == "sqlite-memory"
    with EngineManager(cleanup_interval=60, allow_sqlite_memory=True) as manager:
        assert select_one(manager, spec) == 1


def test_sqlite_uri_filename_is_a_file() -> None:
    url = DatabaseSpec(id=3, uri="sqlite:///file:/tmp/x.db?uri=true").sqlalchemy_url()
    assert not is_sqlite_memory(url)


def test_opting_out_allows_sqlite_files(tmp_path: Path) -> None:
    spec = DatabaseSpec(id=4, uri=f"sqlite:///{tmp_path / 'embedded.db'}")
    with EngineManager(cleanup_interval=60, forbid_unsafe_uris=False) as manager:
        assert select_one(manager, spec) == 1


def test_denied_dialect_by_backend_or_drivername() -> None:
    maria = DatabaseSpec(id=5, uri=MYSQL_URI)
    with EngineManager(cleanup_interval=60, denied_dialects=("mysql",)) as manager:
        error = refused(manager, maria)
    assert error.rule == "denied-dialect" and "mysql+pymysql" in str(error)
    with EngineManager(cleanup_interval=60, denied_dialects=["mysql+pymysql"]) as manager:
        assert refused(manager, maria).rule == "denied-dialect"
    with EngineManager(cleanup_interval=60, denied_dialects=["mysql+mysqldb"]) as manager:
        assert select_one(manager, maria) == 1  # another driver of that backend is not denied


def test_deny_list_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINEHOUSE_DENIED_DIALECTS", '["postgresql"]')
    with EngineManager(cleanup_interval=60) as manager:
        assert refused(manager, DatabaseSpec(id=6, uri=PG_URI)).rule == "denied-dialect"


SEEN: list[tuple[str, object]] = []


def only_port_5432(url: URL, database: DatabaseSpec) -> None:
    SEEN.append((url.render_as_string(hide_password=True), database.id))
    if url.port != 5432:
        raise UnsafeURIError("only-5432", "this server reaches PostgreSQL on port 5432 only")


def broken_validator(url: URL, database: DatabaseSpec) -> None:
    raise RuntimeError(f"cannot parse {url.render_as_string(hide_password=False)}")


def redirect(url: URL, kwargs: dict[str, Any], **_: Any) -> tuple[URL, dict[str, Any]]:
    return url.set(port=6543), kwargs


def test_custom_validator_sees_the_final_url() -> None:
    SEEN.clear()
    spec = DatabaseSpec(id=7, uri=PG_URI)
    with EngineManager(cleanup_interval=60, uri_validator=only_port_5432) as manager:
        assert select_one(manager, spec) == 1
    assert SEEN == [(PG_URI, 7)]
    # A connection mutator cannot route around it: the validator sees its URL.
    with EngineManager(
        cleanup_interval=60, uri_validator=only_port_5432, connection_mutator=redirect
    ) as manager:
        assert refused(manager, spec).rule == "only-5432"


def test_validator_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINEHOUSE_URI_VALIDATOR", f"{__name__}.only_port_5432")
    settings = ManagerSettings.build()
    assert settings.uri_validator is only_port_5432


def test_foreign_validator_error_is_ours_without_the_url() -> None:
    spec = DatabaseSpec(id=8, uri=PG_URI.replace("postgres@", "postgres:s3cr3t-pw@"))
    with EngineManager(cleanup_interval=60, uri_validator=broken_validator) as manager:
        error = refused(manager, spec)
    assert error.rule == "uri-validator" and "RuntimeError" in str(error)
    assert_no_secret(error, what="validator error")
