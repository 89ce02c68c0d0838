"""``engine_context``: a context manager entered around each ``connect()``, on real servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from conftest import PG_URI
from sqlalchemy import event, text
from sqlalchemy.engine import Connection

from enginehouse import DatabaseSpec, EngineManager

pytestmark = pytest.mark.services("postgres", "mariadb")

MYSQL_URI = os.environ.get("ENGINEHOUSE_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")

CALLS: list[tuple[str, object, dict[str, Any]]] = []
TAG: dict[str, str] = {}  # what the hook asks each checkout to set on the session


class HookFailure(Exception):
    """Raised by the hook itself; must reach the caller unchanged."""


@contextmanager
def recording_context(database: DatabaseSpec, **request: Any) -> Iterator[None]:
    CALLS.append(("enter", database.id, request))
    if request["source"] == "refuse":
        raise HookFailure("refused by the per-request hook")
    TAG["value"] = f"{request['source']}:{request['user']}"
    try:
        yield
    finally:
        TAG.pop("value", None)
        CALLS.append(("exit", database.id, request))


def tag_session(connection: Connection, *_branch: object) -> None:
    """What the hook's per-request state does on each checkout (a session variable).

    (SQLAlchemy 1.4 passes a second argument, ``branch``, to ``engine_connect``.)
    """
    if connection.dialect.name == "postgresql":
        statement = "SELECT set_config('eh.tag', :v, false)"
    else:
        statement = "SET @eh_tag = :v"
    connection.execute(text(statement), {"v": TAG.get("value", "")})


def select_one(manager: EngineManager, spec: DatabaseSpec, **request: Any) -> object:
    with manager.connect(spec, **request) as conn:
        return conn.execute(text("SELECT 1")).scalar()


@pytest.fixture
def hooked() -> Iterator[EngineManager]:
    CALLS.clear()
    with EngineManager(cleanup_interval=60, engine_context=recording_context) as manager:
        yield manager


@pytest.mark.parametrize(("uri", "read"), [
    (PG_URI, "SELECT current_setting('eh.tag')"),
    (MYSQL_URI, "SELECT @eh_tag"),
], ids=["postgresql", "mariadb"])
def test_hook_wraps_each_connect_with_the_request(
    hooked: EngineManager, uri: str, read: str
) -> None:
    spec = DatabaseSpec(id=f"ctx-{uri[:5]}", uri=uri)
    engine = hooked.get(spec)
    event.listen(engine, "engine_connect", tag_session)
    try:
        for source, user in (("dashboard", "alice"), ("sql_lab", "bob")):
            with hooked.connect(spec, source=source, user=user) as conn:
                assert CALLS[-1] == ("enter", spec.id, {
                    "catalog": None, "schema": None, "user": user, "source": source})
                assert conn.execute(text(read)).scalar() == f"{source}:{user}"
            assert CALLS[-1][0] == "exit"
    finally:
        event.remove(engine, "engine_connect", tag_session)
    assert [c[0] for c in CALLS] == ["enter", "exit", "enter", "exit"]


def test_hook_error_reaches_the_caller_unchanged(hooked: EngineManager) -> None:
    spec = DatabaseSpec(id="ctx-refuse", uri=PG_URI)
    failure = pytest.raises(HookFailure, match="refused by the per-request hook")
    with failure as caught, hooked.connect(spec, source="refuse"):
        pytest.fail("the body ran although the hook raised")
    assert type(caught.value) is HookFailure and caught.value.__cause__ is None
    assert hooked.stats().created == 0  # entered before the engine is even looked up


def test_body_error_passes_through_the_hook(hooked: EngineManager) -> None:
    spec = DatabaseSpec(id="ctx-body", uri=MYSQL_URI)
    with pytest.raises(ZeroDivisionError), hooked.connect(spec, source="chart", user="carol"):
        raise ZeroDivisionError
    assert [c[0] for c in CALLS] == ["enter", "exit"]


def test_hook_from_environment_and_absent_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = DatabaseSpec(id="ctx-env", uri=PG_URI)
    CALLS.clear()
    with EngineManager(cleanup_interval=60) as manager, manager.connect(spec, source="x"):
        pass
    assert CALLS == []
    monkeypatch.setenv("ENGINEHOUSE_ENGINE_CONTEXT", f"{__name__}.recording_context")
    with EngineManager(cleanup_interval=60, mode="new") as manager:
        assert select_one(manager, spec, source="y", catalog="test") == 1
    assert [c[0] for c in CALLS] == ["enter", "exit"] and CALLS[0][2]["catalog"] == "test"
