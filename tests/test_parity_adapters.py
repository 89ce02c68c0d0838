"""Dialect adapters as an extension point: the Trino adapter, and one installed as a package."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.dialects import registry as dialect_registry
from sqlalchemy.engine import make_url

from enginehouse import DatabaseSpec, EngineManager
from enginehouse import adapters as adapters_module
from enginehouse.adapters import (
    ENTRY_POINT_GROUP,
    BaseAdapter,
    DialectAdapter,
    TrinoAdapter,
    adapter_for,
    has_adapter,
    refresh_adapters,
    register_adapter,
)
from enginehouse.compat import postgres_driver
from enginehouse.errors import DriverNotInstalledError, InvalidSpecError

pytestmark = pytest.mark.services("postgres", "mariadb")

TRINO = make_url("trino://svc@trino.example:8443/hive/default")
ADJUST = {"catalog": None, "schema": None, "user": None, "access_token": None}


def adjust(url: Any = TRINO, kwargs: dict[str, Any] | None = None, **request: Any) -> Any:
    return TrinoAdapter().adjust(url, kwargs or {}, **{**ADJUST, **request})


# -- Trino: URL and argument shaping, no server ----------------------------------------------


def test_trino_places_catalog_and_schema_in_the_url_path() -> None:
    url, _ = adjust(catalog="iceberg", schema="sales")
    assert url.database == "iceberg/sales"
    assert url.username == "svc" and url.host == "trino.example" and url.port == 8443
    url, _ = adjust(catalog="iceberg")  # the URI's schema belonged to hive: dropped
    assert url.database == "iceberg"
    url, _ = adjust(schema="sales")
    assert url.database == "hive/sales"


def test_trino_impersonates_through_the_user_connect_argument() -> None:
    given = {"connect_args": {"http_scheme": "https"}, "pool_size": 3}
    url, kwargs = adjust(kwargs=given, user="alice")
    assert url.username == "svc"  # the authenticated principal stays
    assert kwargs["connect_args"] == {"http_scheme": "https", "user": "alice"}
    assert kwargs["pool_size"] == 3
    assert given == {"connect_args": {"http_scheme": "https"}, "pool_size": 3}  # not mutated


def test_trino_sends_an_access_token_as_the_dialect_expects() -> None:
    url, kwargs = adjust(access_token="eh-trino-token")
    assert url.query["access_token"] == "eh-trino-token"  # trino's dialect: JWT over HTTPS
    assert url.database == "hive/default" and kwargs["connect_args"] == {}


def test_trino_refusals_name_the_field() -> None:
    with pytest.raises(InvalidSpecError) as caught:
        adjust(url=make_url("trino://svc@trino.example:8443"), schema="sales")
    assert caught.value.field == "schema"
    with pytest.raises(InvalidSpecError) as caught:
        adjust(catalog="a/b")
    assert caught.value.field == "catalog"


def test_capability_flags() -> None:
    trino, sqlite = adapter_for("trino"), adapter_for("sqlite")
    assert (trino.supports_catalog, trino.supports_schema, trino.supports_impersonation) == (
        True, True, True)
    assert not sqlite.supports_impersonation and not sqlite.supports_schema
    assert isinstance(adapter_for("no-such-backend"), BaseAdapter)
    with pytest.raises(InvalidSpecError) as caught:
        adapter_for("mysql").adjust(make_url("mysql://h/db"), {}, **{**ADJUST, "catalog": "c"})
    assert caught.value.field == "catalog"


def test_a_backend_with_an_adapter_needs_no_installed_dialect_to_be_valid() -> None:
    spec = DatabaseSpec(id="trino", uri=str(TRINO))
    assert spec.backend == "trino"
    with pytest.raises(InvalidSpecError, match="unknown dialect"):
        DatabaseSpec(id="nope", uri="nosuchdb://h/x")
    with EngineManager(cleanup_interval=60) as manager:
        if importlib.util.find_spec("trino") is None:
            with pytest.raises(DriverNotInstalledError, match="trino"):
                manager.get(spec, catalog="iceberg", user="alice")
        else:  # with the driver installed, the engine builds (no connection is made)
            assert manager.get(spec, catalog="iceberg").url.database == "iceberg"


def test_register_adapter_by_name_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapters_module, "_ADAPTERS", dict(adapters_module._ADAPTERS))
    custom = TrinoAdapter()
    register_adapter("postgresql", custom)
    assert adapter_for("postgresql") is custom
    with pytest.raises(InvalidSpecError) as caught:
        register_adapter("x", object())
    assert caught.value.field == "adapter"


# -- a third-party adapter package, installed with pip ----------------------------------------

PACKAGE_MODULE = '''
"""A third-party package: a dialect alias of PostgreSQL and its enginehouse adapter."""
from sqlalchemy.dialects.postgresql.DRIVER import PGDialect_DRIVER as PostgresDialect

from enginehouse.adapters import PostgresAdapter


class EhpgDialect(PostgresDialect):
    supports_statement_cache = True


class DemoAdapter(PostgresAdapter):
    name = "ehpg"

    def adjust(self, url, engine_kwargs, **request):
        url, kwargs = super().adjust(url, engine_kwargs, **request)
        kwargs["connect_args"].setdefault("application_name", "ehdemo-adapter")
        return url, kwargs


NOT_AN_ADAPTER = object()
'''.replace("DRIVER", postgres_driver())  # psycopg 3 on SQLAlchemy 2, psycopg2 on 1.4

ENTRY_POINTS = f"""[{ENTRY_POINT_GROUP}]
ehpg = ehdemo_adapter:DemoAdapter
ehbroken = ehdemo_adapter:NOT_AN_ADAPTER

[sqlalchemy.dialects]
ehpg = ehdemo_adapter:EhpgDialect
"""


def build_wheel(folder: Path) -> Path:
    """A minimal, valid wheel (PEP 427) with the module and its entry points."""
    info = "enginehouse_adapter_demo-0.1.dist-info"
    files = {
        "ehdemo_adapter.py": PACKAGE_MODULE,
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: enginehouse-adapter-demo\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: enginehouse-tests\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/entry_points.txt": ENTRY_POINTS,
    }
    record = []
    for name, content in files.items():
        digest = hashlib.sha256(content.encode()).digest()
        encoded = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.append(f"{name},sha256={encoded},{len(content.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    wheel = folder / "enginehouse_adapter_demo-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return wheel


@pytest.fixture
def installed_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``pip install`` the package into a private site dir placed on ``sys.path``."""
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--disable-pip-version-check", "--target", str(site), str(build_wheel(tmp_path))],
        check=True, capture_output=True, timeout=120,
    )
    monkeypatch.setattr(adapters_module, "_ADAPTERS", dict(adapters_module._ADAPTERS))
    monkeypatch.syspath_prepend(str(site))
    refresh_adapters()
    yield site
    refresh_adapters()
    sys.modules.pop("ehdemo_adapter", None)
    dialect_registry.impls.pop("ehpg", None)


def test_entry_point_adapter_from_an_installed_package(installed_package: Path) -> None:
    assert (installed_package / "ehdemo_adapter.py").is_file()
    assert has_adapter("ehpg")
    spec = DatabaseSpec(id="ehpg", uri="ehpg://postgres@127.0.0.1:5432/test")
    with EngineManager(cleanup_interval=60) as manager, manager.connect(spec, schema="public") as c:
        # The package's adapter shaped this connection; the inherited rules still apply.
        assert c.execute(text("SHOW application_name")).scalar() == "ehdemo-adapter"
        assert c.execute(text("SHOW search_path")).scalar() == '"public"'
    adapter = adapter_for("ehpg")
    assert type(adapter).__name__ == "DemoAdapter" and isinstance(adapter, DialectAdapter)


def test_a_broken_entry_point_is_named_in_the_error(installed_package: Path) -> None:
    with pytest.raises(InvalidSpecError) as caught:
        adapter_for("ehbroken")
    assert caught.value.field == "adapter"
    assert "ehbroken" in str(caught.value) and "DialectAdapter" in str(caught.value)
