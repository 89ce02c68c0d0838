"""Impersonation variants: URL username, email prefix, and OAuth2 access tokens (refreshable)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import PG_URI
from prometheus_client import generate_latest
from pydantic import SecretStr
from secret_scan import assert_no_secret, register_secret
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Engine

from enginehouse import DatabaseSpec, DefaultEngines, EngineManager, engines
from enginehouse import adapters as adapters_module
from enginehouse.adapters import PostgresAdapter
from enginehouse.errors import InvalidSpecError
from enginehouse.integrations.metrics import disable_pool_events, registry_for

pytestmark = pytest.mark.services("postgres", "mariadb")

MYSQL_URI = os.environ.get("ENGINEHOUSE_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")

TOKENS = ("eh-tok-alice-1", "eh-tok-alice-2", "eh-tok-bob-1", "eh-tok-pw-1", "eh-tok-pw-2")
register_secret("eh-tok-bob-2")
register_secret(*TOKENS)
ALICE_1, ALICE_2, BOB_1, PW_1, PW_2 = TOKENS


class TokenAsApplicationName(PostgresAdapter):
    """A test adapter that puts the token where the server shows it back (never do this)."""

    def place_token(
        self, url: URL, kwargs: dict[str, Any], token: str
    ) -> tuple[URL, dict[str, Any]]:
        kwargs["connect_args"]["application_name"] = token
        return url, kwargs


@pytest.fixture
def visible_tokens(monkeypatch: pytest.MonkeyPatch) -> Iterator[EngineManager]:
    monkeypatch.setitem(adapters_module._ADAPTERS, "postgresql", TokenAsApplicationName())
    with EngineManager(cleanup_interval=60) as manager:
        yield manager


def fresh_spec(database_id: str, **kw: Any) -> DatabaseSpec:
    # NullPool: every connect() opens a new DBAPI connection, which reads the current token.
    return DatabaseSpec(id=database_id, uri=PG_URI, extra={"engine_params": {"poolclass": "null"}},
                        **kw)


def application_name(
    manager: EngineManager | DefaultEngines, spec: DatabaseSpec, **request: Any
) -> str:
    with manager.connect(spec, **request) as conn:
        return str(conn.execute(text("SHOW application_name")).scalar())


def engine_application_name(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(text("SHOW application_name")).scalar())


def test_token_refresh_keeps_one_engine_per_user(visible_tokens: EngineManager) -> None:
    manager = visible_tokens
    spec = fresh_spec("tok-refresh")
    alice = manager.get(spec, user="alice", access_token=ALICE_1)
    assert engine_application_name(alice) == ALICE_1
    # A refreshed token: the same engine, and its next connection carries the new token.
    assert manager.get(spec, user="alice", access_token=SecretStr(ALICE_2)) is alice
    assert engine_application_name(alice) == ALICE_2
    bob = manager.get(spec, user="bob", access_token=BOB_1)
    assert bob is not alice
    assert application_name(manager, spec, user="bob", access_token=BOB_1) == BOB_1
    assert engine_application_name(alice) == ALICE_2  # bob's token did not leak into alice's
    # Without a token (and without impersonate_user) a request is nobody's: the shared engine.
    shared = manager.get(spec, user="alice")
    assert shared is not alice and engine_application_name(shared) != ALICE_2
    stats = manager.stats()
    assert stats.created == 3 and stats.engine_count == 3
    for token in TOKENS:
        assert token not in repr(stats)


def test_pooled_connections_keep_their_session_new_ones_get_the_new_token(
    visible_tokens: EngineManager,
) -> None:
    spec = DatabaseSpec(id="tok-pooled", uri=PG_URI)
    engine = visible_tokens.get(spec, user="alice", access_token=ALICE_1)
    with engine.connect() as first:
        visible_tokens.get(spec, user="alice", access_token=ALICE_2)
        with engine.connect() as second:  # the pool must open a new one
            assert second.execute(text("SHOW application_name")).scalar() == ALICE_2
        assert first.execute(text("SHOW application_name")).scalar() == ALICE_1


def test_token_is_the_password_for_the_postgres_adapter_and_never_in_the_url() -> None:
    seen: list[str | None] = []

    def capture(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        seen.append(cparams.get("password"))

    spec = fresh_spec("tok-password")
    with EngineManager(cleanup_interval=60) as manager:
        engine = manager.get(spec, user="svc", access_token=PW_1)
        event.listen(engine, "do_connect", capture)  # runs after ours: sees the final params
        with manager.connect(spec, user="svc", access_token=PW_2) as conn:  # trust auth: accepted
            assert conn.execute(text("SELECT 1")).scalar() == 1
        assert seen == [PW_2]
        assert engine.url.password is None
        assert_no_secret(engine.url.render_as_string(hide_password=False), what="engine URL")


def test_token_needs_a_user_and_a_dialect_that_impersonates() -> None:
    with EngineManager(cleanup_interval=60, allow_sqlite_memory=True) as manager:
        with pytest.raises(InvalidSpecError) as caught:
            manager.get(DatabaseSpec(id="tok-nouser", uri=PG_URI), access_token=PW_1)
        assert caught.value.field == "user"
        with pytest.raises(InvalidSpecError) as caught:
            manager.get(DatabaseSpec(id="tok-sqlite", uri="sqlite://"), user="a", access_token=PW_1)
        assert caught.value.field == "access_token"
        assert_no_secret(caught.value, what="error")


def test_new_mode_and_default_engines_take_a_token(
    visible_tokens: EngineManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = DatabaseSpec(id="tok-new", uri=PG_URI)
    with EngineManager(cleanup_interval=60, mode="new") as manager:
        assert application_name(manager, spec, user="alice", access_token=ALICE_1) == ALICE_1
    engines.configure(cleanup_interval=60)
    try:
        assert application_name(engines, spec, user="bob", access_token=BOB_1) == BOB_1
        refreshed = engines.get(spec, user="bob", access_token="eh-tok-bob-2")
        assert refreshed is engines.get(spec, user="bob", access_token=BOB_1)
    finally:
        engines.shutdown()


def test_tokens_never_reach_logs(
    visible_tokens: EngineManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    spec = fresh_spec("tok-logs", impersonate_user=True)
    manager = visible_tokens
    for token in (ALICE_1, ALICE_2):
        with manager.connect(spec, user="postgres", access_token=token) as conn:
            conn.execute(text("SELECT 1"))
    manager.dispose(spec.id)
    assert caplog.records
    assert_no_secret(caplog.text, what="log")
    assert_no_secret(repr(manager.stats()), what="stats")


# -- impersonation through the URL -------------------------------------------------------


@pytest.mark.parametrize(("uri", "login"), [(PG_URI, "postgres"), (MYSQL_URI, "root")],
                         ids=["postgresql", "mariadb"])
def test_email_prefix_mode_impersonates_the_login(uri: str, login: str) -> None:
    spec = DatabaseSpec(id=f"email-{login}", uri=uri, impersonate_user=True)
    email = f"{login}@corp.example"
    with EngineManager(cleanup_interval=60, impersonate_with_email_prefix=True) as manager:
        with manager.connect(spec, user=email) as conn:
            assert str(conn.execute(text("SELECT current_user")).scalar()).startswith(login)
        assert manager.stats().engines[0].user == login
    with EngineManager(cleanup_interval=60) as manager:  # default: the name as given
        assert manager.get(spec, user=email).url.username == email


def test_secrets_never_become_metric_labels_or_values(visible_tokens: EngineManager) -> None:
    register_secret("eh-metric-secret-extra")
    spec = DatabaseSpec(
        id="tok-metrics",
        uri=PG_URI,
        impersonate_user=True,
        encrypted_extra={
            "engine_params": {"connect_args": {"options": "-ceh.k=eh-metric-secret-extra"}}
        },
    )
    registry = registry_for(visible_tokens)
    try:
        for token in (ALICE_1, ALICE_2):
            with visible_tokens.connect(spec, user="postgres", access_token=token) as conn:
                conn.execute(text("SELECT 1"))
        exposition = generate_latest(registry).decode()
    finally:
        disable_pool_events()
    assert 'database="tok-metrics"' in exposition
    assert_no_secret(exposition, what="metrics")


@pytest.mark.parametrize("bad", ["", SecretStr(""), 42])
def test_a_malformed_token_is_refused_before_any_connection(bad: Any) -> None:
    spec = DatabaseSpec(id="tok-bad", uri=PG_URI)
    with EngineManager(cleanup_interval=60) as manager:
        engine = manager.get(spec, user="alice", access_token=PW_1)
        with pytest.raises(InvalidSpecError) as caught:
            manager.get(spec, user="alice", access_token=bad)  # on a hit
        assert caught.value.field == "access_token"
        with pytest.raises(InvalidSpecError):
            manager.get(spec, user="carol", access_token=bad)  # on a miss
        assert manager.get(spec, user="alice", access_token=PW_1) is engine
