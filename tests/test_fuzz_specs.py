"""Fuzzing (hypothesis): specs and settings either work or raise our error naming the field.

Targets: ``DatabaseSpec`` (uri, extra, encrypted_extra as dicts and JSON text,
nested garbage, NaN/Infinity, huge numbers, unicode, wrong types),
``SSHTunnelSpec`` and ``ManagerSettings`` (keywords and ``ENGINEHOUSE_*``
variables). For every input: it validates, or it raises an
``EngineManagerError`` that is a ``ValueError``, names a field of the model,
and quotes none of the secrets the input carried. A valid database spec is
also planned and handed to a real manager (``create_engine`` in the registry
actor); afterwards that manager still serves a PostgreSQL query.

Each example runs under a hypothesis ``deadline`` (bounded time without a
timing assertion); ``derandomize=True`` keeps CI runs identical.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from conftest import PG_URI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from secret_scan import assert_no_secret, register_secret
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from enginehouse import DatabaseSpec, EngineManager, SSHTunnelSpec
from enginehouse.errors import EngineManagerError
from enginehouse.plan import build_plan, request_key
from enginehouse.settings import ManagerSettings
from enginehouse.specs import POOL_CLASSES

pytestmark = pytest.mark.services("postgres")

DB_SECRET = "fz-db-s3cr3t"
QUERY_SECRET = "fz-query-s3cr3t"
ENC_SECRET = "fz-enc-s3cr3t"
SSH_SECRET = "fz-ssh-s3cr3t"
FLEET_SECRET = "fz-fleet-s3cr3t"
register_secret(DB_SECRET, QUERY_SECRET, ENC_SECRET, SSH_SECRET, FLEET_SECRET)

FUZZ = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    # Generous for a loaded 2-core machine; what it catches is a spin or a hang.
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies ----------------------------------------------------------------

HUGE = st.sampled_from([10**19, -(10**19), 10**40, 2**63, 10**300])
NUMBERS = st.one_of(
    st.integers(min_value=-5, max_value=20_000),
    st.floats(allow_nan=True, allow_infinity=True),
    HUGE,
    st.booleans(),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12))
JSON_TREES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
CREATE_ENGINE_ARGS = st.sampled_from(
    ["pool_pre_ping", "pool_use_lifo", "echo", "isolation_level", "pool_reset_on_return",
     "execution_options", "no_such_argument", "hide_parameters"]
)
ENGINE_PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "pool_size": NUMBERS | SCALARS,
        "max_overflow": NUMBERS,
        "pool_timeout": NUMBERS,
        "pool_recycle": NUMBERS,
        "poolclass": st.sampled_from(POOL_CLASSES) | st.text(max_size=8) | NUMBERS,
        "connect_args": st.dictionaries(
            st.sampled_from(["connect_timeout", "timeout", "application_name", "options"]),
            NUMBERS | st.text(max_size=8),
            max_size=3,
        )
        | JSON_TREES,
    },
) | st.dictionaries(CREATE_ENGINE_ARGS, SCALARS, max_size=2)
EXTRA_DICTS = st.fixed_dictionaries(
    {},
    optional={
        "engine_params": ENGINE_PARAMS | JSON_TREES,
        "max_connections": NUMBERS | SCALARS,
        "metadata_params": JSON_TREES,
    },
)


def _as_json_text(value: Any) -> str:
    return json.dumps(value, allow_nan=True)  # NaN/Infinity as JavaScript writes them


EXTRAS = st.one_of(
    EXTRA_DICTS,
    EXTRA_DICTS.map(_as_json_text),
    JSON_TREES,
    st.text(max_size=40),
    st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n + "]" * n),
    st.integers(min_value=1, max_value=3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.just('{"x": 1' + "0" * 5000 + "}"),
    st.binary(max_size=20),
)
SECRET_TREES = st.recursive(
    st.sampled_from([ENC_SECRET, f"pre-{ENC_SECRET}"]) | SCALARS,
    lambda children: st.dictionaries(
        st.sampled_from([ENC_SECRET, "engine_params", "connect_args", "pool_timeout", "token"]),
        children,
        max_size=3,
    ),
    max_leaves=8,
)
ENCRYPTED = st.one_of(
    st.none(),
    SECRET_TREES,
    SECRET_TREES.map(_as_json_text),
    st.just(f"ciphertext:{ENC_SECRET}"),
    st.lists(st.just(ENC_SECRET), max_size=2),
    st.just({"engine_params": {"connect_args": {"password": ENC_SECRET}, "pool_size": 2}}),
)
URIS = st.one_of(
    st.sampled_from(
        [
            PG_URI,
            PG_URI.replace("postgres@", f"postgres:{DB_SECRET}@"),
            f"{PG_URI}?sslpassword={QUERY_SECRET}&application_name=fuzz",
            f"{PG_URI}?access_token={QUERY_SECRET}&token={QUERY_SECRET}",
            f"mysql+pymysql://root:{DB_SECRET}@127.0.0.1:3306/test",
            "sqlite://",
            f"nosuchdialect://u:{DB_SECRET}@h/db",
            f"postgresql+nosuchdriver://u:{DB_SECRET}@h/db",
        ]
    ),
    st.text(max_size=30),
    st.builds(
        lambda host, port, db: f"postgresql+psycopg://u:{DB_SECRET}@{host}:{port}/{db}",
        st.text(max_size=8),
        st.text(max_size=6),
        st.text(max_size=6),
    ),
)
IDS = st.one_of(st.integers(min_value=1, max_value=50), st.text(max_size=6), NUMBERS, st.none())
TUNNELS = st.fixed_dictionaries(
    {
        "server_address": st.text(max_size=12) | st.just("127.0.0.1"),
        "username": st.text(max_size=8) | st.just("fuzz"),
    },
    optional={
        "server_port": NUMBERS | st.text(max_size=5),
        "password": st.sampled_from([SSH_SECRET, "", None]),
        "private_key": st.sampled_from([f"-----BEGIN KEY-----\n{SSH_SECRET}\n", SSH_SECRET]),
        "private_key_password": st.sampled_from([SSH_SECRET, None]),
        "host_key": st.text(max_size=30) | st.sampled_from(
            ["ssh-ed25519 AAAA", "\x00", "~nobody/x", "~no-such-user-zz/known_hosts", "/root"]
        ),
        "host_key_policy": st.sampled_from(["strict", "pin-first", "accept"]) | st.text(max_size=6),
    },
)

# -- the property ----------------------------------------------------------------


def refused(exc: BaseException, fields: Any) -> None:
    """Our error: an EngineManagerError and ValueError naming a field of ``fields``, no secret."""
    assert isinstance(exc, EngineManagerError), f"{type(exc).__name__} escaped"
    assert isinstance(exc, ValueError)
    field = getattr(exc, "field", "")
    root = field.split(".")[0].split("[")[0]
    named = field in fields or root in fields or root in ("spec", "settings", "environment")
    assert named, field
    assert_no_secret(exc, what="error")


def attempt(build: Callable[[], Any], fields: Any) -> Any:
    try:
        return build()
    except EngineManagerError as exc:
        refused(exc, fields)
        return None


@pytest.fixture(scope="module")
def fuzz_manager() -> Iterator[EngineManager]:
    with EngineManager(
        cleanup_interval=60, ask_timeout=10, max_engines=4, forbid_unsafe_uris=False
    ) as manager:
        yield manager


DB_FIELDS = set(DatabaseSpec.model_fields)
SSH_FIELDS = set(SSHTunnelSpec.model_fields)
SETTINGS_FIELDS = set(ManagerSettings.model_fields)


@FUZZ
@given(extra=EXTRAS)
def test_extra_works_or_names_the_field(fuzz_manager: EngineManager, extra: Any) -> None:
    check_database(fuzz_manager, {"id": "fuzz-extra", "uri": PG_URI, "extra": extra})


@FUZZ
@given(encrypted=ENCRYPTED, extra=st.sampled_from([{}, {"engine_params": {"pool_size": 2}}]))
def test_encrypted_extra_works_or_names_the_field(
    fuzz_manager: EngineManager, encrypted: Any, extra: Any
) -> None:
    data = {"id": "fuzz-enc", "uri": PG_URI, "extra": extra, "encrypted_extra": encrypted}
    check_database(fuzz_manager, data)


@FUZZ
@given(uri=URIS, id_=IDS)
def test_uri_and_id_work_or_name_the_field(fuzz_manager: EngineManager, uri: Any, id_: Any) -> None:
    check_database(fuzz_manager, {"id": id_, "uri": uri})


@FUZZ
@given(id_=IDS, uri=URIS, extra=EXTRAS, encrypted=ENCRYPTED, tunnel=st.none() | TUNNELS)
def test_database_spec_works_or_names_the_field(
    fuzz_manager: EngineManager, id_: Any, uri: Any, extra: Any, encrypted: Any, tunnel: Any
) -> None:
    data = {"id": id_, "uri": uri, "extra": extra, "encrypted_extra": encrypted}
    if tunnel is not None:
        data["ssh_tunnel"] = tunnel
    check_database(fuzz_manager, data)


def check_database(manager: EngineManager, data: dict[str, Any]) -> None:
    """Validate, render, plan and serve ``data``; each step works or raises our error."""
    spec = attempt(lambda: DatabaseSpec.model_validate(data), DB_FIELDS)
    if spec is None:
        return
    for shown in (repr(spec), str(spec), spec.uri, spec.fingerprint, str(spec.engine_params)):
        assert_no_secret(shown, what="a valid spec's rendering")
    key = request_key(spec, manager.settings, catalog=None, schema=None, user=None, source=None)
    plan = attempt(lambda: build_plan(spec, key, manager.settings), DB_FIELDS)
    if plan is None:
        return
    assert_no_secret(repr(plan), what="plan repr")
    assert_finite(spec.extra)
    if spec.ssh_tunnel is None and spec.backend == "postgresql" and spec.uri.startswith(PG_URI):
        serve(manager, spec)


def assert_finite(tree: Any) -> None:
    """A valid extra holds no NaN/Infinity and no integer past 64 bits (issue 13 item 2)."""
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            assert math.isfinite(item)
        elif isinstance(item, int):
            assert abs(item) < 2**63
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def serve(manager: EngineManager, spec: DatabaseSpec) -> None:
    """Build the engine in the registry and run a query on it; then give it back.

    Our errors name their step; a driver's own refusal of a fuzzed connect
    argument reaches the caller unchanged (docs/security.md), wrapped by SQLAlchemy.
    """
    try:
        with manager.connect(spec) as conn:
            assert conn.execute(text("select 1")).scalar() == 1
    except (EngineManagerError, DBAPIError) as exc:
        assert_no_secret(exc, what="error while serving")
    finally:
        manager.dispose(spec.id)


@FUZZ
@given(data=TUNNELS)
def test_ssh_tunnel_spec_works_or_names_the_field(data: dict[str, Any]) -> None:
    spec = attempt(lambda: SSHTunnelSpec.model_validate(data), SSH_FIELDS)
    if spec is None:
        return
    assert_no_secret(repr(spec), what="tunnel repr")
    assert spec.fingerprint and spec.bastion
    attempt(spec.host_key_lines, SSH_FIELDS | {"ssh_tunnel"})


IMPORTS = st.sampled_from(
    ["json.dumps", "no.such.module.func", "", "json:dumps", "os.path", "enginehouse.specs.MASK"]
)
SETTING_VALUES: dict[str, Any] = {
    name: NUMBERS | st.text(max_size=8) | st.none()
    for name in SETTINGS_FIELDS
    if name not in {"connection_mutator", "uri_validator", "encrypted_extra_decryptor",
                    "engine_context", "fleet_url"}
}
SETTING_VALUES.update(
    {
        name: IMPORTS | NUMBERS
        for name in ("connection_mutator", "uri_validator", "encrypted_extra_decryptor",
                     "engine_context")
    }
)
SETTING_VALUES["fleet_url"] = st.sampled_from(
    [
        f"redis://:{FLEET_SECRET}@127.0.0.1:6379/0",
        f"redis://:{FLEET_SECRET}@:0/0",
        f"http://:{FLEET_SECRET}@h/",
        f"redis://:{FLEET_SECRET}@[::1",
        FLEET_SECRET,
    ]
)
SETTING_VALUES["mode"] = st.sampled_from(["new", "singleton", "sometimes"]) | NUMBERS
SETTING_VALUES["denied_dialects"] = st.lists(st.text(max_size=6), max_size=3) | NUMBERS | st.text()
SETTINGS_DICTS = st.fixed_dictionaries({}, optional=SETTING_VALUES) | st.dictionaries(
    st.text(max_size=10), SCALARS, max_size=2
)


@FUZZ
@given(values=SETTINGS_DICTS)
def test_settings_work_or_name_the_setting(values: dict[str, Any]) -> None:
    built = attempt(lambda: ManagerSettings.build(**values), SETTINGS_FIELDS | set(values))
    if built is not None:
        assert_no_secret(repr(built), what="settings repr")


IMPORT_SETTINGS = {
    "connection_mutator", "uri_validator", "encrypted_extra_decryptor", "engine_context"
}
ENV_VALUES = st.dictionaries(
    st.sampled_from(sorted(SETTING_VALUES.keys() - IMPORT_SETTINGS)),
    st.text(max_size=10).filter(lambda s: "\x00" not in s)
    | st.sampled_from(["nan", "inf", "-Infinity", "1e400", "9" * 40, "[1", '["a"]', "true"]),
    max_size=4,
)


@FUZZ
@given(env=ENV_VALUES)
def test_settings_from_the_environment_work_or_name_the_setting(env: dict[str, str]) -> None:
    names = {f"ENGINEHOUSE_{name.upper()}": value for name, value in env.items()}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        attempt(ManagerSettings.build, SETTINGS_FIELDS)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def test_after_the_fuzzing_the_manager_still_serves_postgresql(
    fuzz_manager: EngineManager,
) -> None:
    # Runs last in this module (pytest keeps file order): the same manager the fuzz fed.
    spec = DatabaseSpec(id="after-fuzz", uri=PG_URI)
    with fuzz_manager.connect(spec) as conn:
        assert conn.execute(text("select 1")).scalar() == 1
    assert fuzz_manager.stats().restarts == 0
