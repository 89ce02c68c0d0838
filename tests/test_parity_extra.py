"""``encrypted_extra``: validated, masked, merged by the adapter on real servers, digested."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from conftest import PG_URI
from pydantic import SecretStr
from secret_scan import assert_no_secret, register_secret
from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.errors import EngineManagerError, InvalidSpecError

pytestmark = pytest.mark.services("postgres", "mariadb")

MYSQL_URI = os.environ.get("ENGINEHOUSE_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")
ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"

SECRET_APP = "eh-secret-app-7f3a"
SECRET_MARK = "eh-secret-mark-91c2"
register_secret(SECRET_APP, SECRET_MARK)


def admin(sql: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def secret_extra(application_name: str) -> dict[str, object]:
    return {"engine_params": {"connect_args": {"application_name": application_name}}}


@pytest.fixture
def pg_manager() -> Iterator[EngineManager]:
    with EngineManager(cleanup_interval=60, ask_timeout=10) as manager:
        yield manager


# -- the spec ------------------------------------------------------------------------


def test_encrypted_extra_is_masked_in_repr_str_and_dump() -> None:
    spec = DatabaseSpec(id=1, uri=PG_URI, encrypted_extra=secret_extra(SECRET_APP))
    assert isinstance(spec.encrypted_extra, SecretStr)
    for shown in (repr(spec), str(spec), spec.model_dump_json(), repr(spec.model_dump())):
        assert_no_secret(shown, what="spec rendering")
    assert spec.decrypted_extra() == secret_extra(SECRET_APP)


@pytest.mark.parametrize(
    "given",
    [secret_extra(SECRET_APP), json.dumps(secret_extra(SECRET_APP))],
    ids=["dict", "json-text"],
)
def test_encrypted_extra_accepts_a_dict_or_json_text(given: object) -> None:
    spec = DatabaseSpec(id=1, uri=PG_URI, encrypted_extra=given)
    assert spec.decrypted_extra() == secret_extra(SECRET_APP)


def test_encrypted_extra_must_be_an_object_and_the_error_quotes_nothing() -> None:
    with pytest.raises(InvalidSpecError) as caught:
        DatabaseSpec(id=1, uri=PG_URI, encrypted_extra=json.dumps([SECRET_APP]))
    assert caught.value.field == "encrypted_extra"
    assert "JSON object" in caught.value.reason
    assert_no_secret(caught.value, what="error")


def test_fingerprint_changes_with_encrypted_extra_but_holds_only_a_digest() -> None:
    a = DatabaseSpec(id=1, uri=PG_URI, encrypted_extra=secret_extra("eh-app-a"))
    b = DatabaseSpec(id=1, uri=PG_URI, encrypted_extra=secret_extra("eh-app-b"))
    same = DatabaseSpec(id=1, uri=PG_URI, encrypted_extra=secret_extra("eh-app-a"))
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == same.fingerprint
    assert "eh-app-a" not in a.fingerprint and len(a.fingerprint) == 32


def test_merged_engine_params_are_checked_naming_the_secret_field() -> None:
    spec = DatabaseSpec(id=1, uri=PG_URI, encrypted_extra={"engine_params": {"pool_size": -5}})
    with EngineManager(cleanup_interval=60) as manager:
        with pytest.raises(InvalidSpecError) as caught:
            manager.get(spec)
        assert manager.stats().created == 0
    assert caught.value.field == "encrypted_extra.engine_params.pool_size"
    assert caught.value.reason == "must be >= 0"


# -- merged into the engine, on real servers ---------------------------------------------


def test_postgres_connect_args_come_from_encrypted_extra(pg_manager: EngineManager) -> None:
    name = f"eh-parity-{uuid.uuid4().hex[:8]}"
    spec = DatabaseSpec(
        id="pg-extra",
        uri=PG_URI,
        extra={"engine_params": {"pool_size": 2, "connect_args": {"application_name": "plain"}}},
        encrypted_extra=secret_extra(name),
    )
    with pg_manager.connect(spec) as conn:
        assert conn.execute(text("SHOW application_name")).scalar() == name
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    # The server sees it too, and the pool settings of the plain extra were kept.
    assert admin("SELECT application_name FROM pg_stat_activity WHERE pid = %s", pid) == [(name,)]
    assert pg_manager.get(spec).pool.size() == 2


def test_mariadb_connect_args_deep_merged_over_extra(pg_manager: EngineManager) -> None:
    spec = DatabaseSpec(
        id="maria-extra",
        uri=MYSQL_URI,
        extra={
            "engine_params": {"connect_args": {"connect_timeout": 7, "init_command": "SET @a=1"}}
        },
        encrypted_extra={
            "engine_params": {"connect_args": {"init_command": "SET @eh_mark='eh-merged'"}}
        },
    )
    engine = pg_manager.get(spec)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT @eh_mark")).scalar() == "eh-merged"
        assert conn.execute(text("SELECT @a")).scalar() is None  # the secret value won
        assert conn.connection.dbapi_connection.connect_timeout == 7  # the plain one stayed


def test_decryptor_setting_turns_ciphertext_into_the_extra() -> None:
    name = f"eh-decrypted-{uuid.uuid4().hex[:8]}"
    ciphertext = json.dumps(secret_extra(name))[::-1]  # "encrypted" at rest: reversed
    spec = DatabaseSpec(id="pg-cipher", uri=PG_URI, encrypted_extra=ciphertext)
    decrypting = EngineManager(encrypted_extra_decryptor=reverse, cleanup_interval=60)
    with decrypting as manager, manager.connect(spec) as conn:
        assert conn.execute(text("SHOW application_name")).scalar() == name
    with EngineManager(cleanup_interval=60) as manager, pytest.raises(InvalidSpecError) as caught:
        manager.get(spec)  # no decryptor: ciphertext is not JSON
    assert caught.value.field == "encrypted_extra"
    assert "encrypted_extra_decryptor" in caught.value.reason


def reverse(ciphertext: str) -> str:
    return ciphertext[::-1]


def failing_decryptor(ciphertext: str) -> str:
    raise ValueError(f"bad padding near {SECRET_MARK} in {ciphertext}")


def test_errors_and_logs_never_show_encrypted_extra(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    spec = DatabaseSpec(id="pg-scan", uri=PG_URI, encrypted_extra=secret_extra(SECRET_APP))
    bad_pool = DatabaseSpec(
        id="pg-bad", uri=PG_URI, encrypted_extra={"engine_params": {"poolclass": SECRET_MARK}}
    )
    bad_arg = DatabaseSpec(
        id="pg-arg", uri=PG_URI, encrypted_extra={"engine_params": {SECRET_MARK: SECRET_APP}}
    )
    cipher = DatabaseSpec(id="pg-fail", uri=PG_URI, encrypted_extra=SECRET_MARK * 2)
    errors: list[BaseException] = []
    with EngineManager(cleanup_interval=60) as manager:
        with manager.connect(spec) as conn:
            conn.execute(text("SELECT 1"))
        assert_no_secret(manager.stats(), what="stats")
        assert_no_secret(repr(manager.get(spec)), what="engine repr")
        for broken in (bad_pool, bad_arg):
            with pytest.raises(EngineManagerError) as caught:
                manager.get(broken)
            errors.append(caught.value)
    with EngineManager(encrypted_extra_decryptor=failing_decryptor) as manager:
        with pytest.raises(InvalidSpecError) as caught:
            manager.get(cipher)
        errors.append(caught.value)
    assert [type(e).__name__ for e in errors] == [
        "InvalidSpecError", "EngineCreationError", "InvalidSpecError"
    ]
    assert errors[0].field == "encrypted_extra.engine_params.poolclass"  # type: ignore[attr-defined]
    for error in errors:
        assert_no_secret(error, what="error")
    assert caplog.records, "the manager logged nothing at DEBUG: the scan would prove nothing"
    assert_no_secret(caplog.text, what="log")


# -- a spec change is a new key ----------------------------------------------------------


def pids_alive(pids: set[int]) -> set[int]:
    rows = admin("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", list(pids))
    return {int(row[0]) for row in rows}  # type: ignore[call-overload]


CHANGES: dict[str, Callable[[DatabaseSpec], DatabaseSpec]] = {
    "encrypted_extra": lambda s: s.model_copy(update={"encrypted_extra": SecretStr(
        json.dumps(secret_extra("eh-v2")))}),
    "extra": lambda s: DatabaseSpec(
        id=s.id, uri=s.uri, extra={"engine_params": {"pool_size": 3}},
        encrypted_extra=s.encrypted_extra,
    ),
    "uri": lambda s: DatabaseSpec(
        id=s.id, uri=s.uri + "?connect_timeout=9", encrypted_extra=s.encrypted_extra
    ),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_spec_change_disposes_the_old_engine_on_next_use(
    pg_manager: EngineManager, change: str, poll: Callable[..., object]
) -> None:
    v1 = DatabaseSpec(id=f"pg-change-{change}", uri=PG_URI, encrypted_extra=secret_extra("eh-v1"))
    old = pg_manager.get(v1)
    with old.connect() as a, old.connect() as b:  # two pooled connections stay open
        pids = {a.execute(text("SELECT pg_backend_pid()")).scalar_one() for a in (a, b)}
    assert pids_alive(pids) == pids
    v2 = CHANGES[change](v1)
    assert v2.fingerprint != v1.fingerprint
    new = pg_manager.get(v2)
    assert new is not old
    poll(lambda: not pids_alive(pids), what="the old engine's connections to close")
    engines = [e for e in pg_manager.stats().engines if e.database_id == v1.id]
    assert len(engines) == 1
    with new.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
