"""enginehouse.compat on the stack this runs on (both stacks run it): each function does its job.

If an upgrade of SQLAlchemy or pykka moves an internal we rely on, a test here
fails, naming the function, before the budget or fork code misbehaves.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Any

import pykka
import pytest
import sqlalchemy
from conftest import PG_URI
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool, QueuePool, SingletonThreadPool

from enginehouse import compat
from enginehouse.budgeted_pool import BudgetedQueuePool


def sqlite_creator() -> Any:  # a DBAPI connection (typed Any, as SQLAlchemy's creator wants)
    return sqlite3.connect(":memory:", check_same_thread=False)


def counting(calls: list[Any]) -> Any:
    """A wrap for the creator hooks that records each physical connect."""

    def wrap(connect: compat.Creator) -> compat.Creator:
        def connect_counted(connection_record: Any = None) -> Any:
            calls.append(connection_record)
            return connect(connection_record)

        return connect_counted

    return wrap


# -- Python -----------------------------------------------------------------------------------


class Colour(compat.StrEnum):
    RED = "red"


def test_str_enum_members_are_their_value_as_text() -> None:
    assert (sys.version_info >= (3, 11)) == compat.PY311
    assert isinstance(Colour.RED, str) and Colour.RED == "red"
    assert (str(Colour.RED), f"{Colour.RED}", f"{Colour.RED}") == ("red",) * 3
    assert Colour("red") is Colour.RED


# -- dialects ---------------------------------------------------------------------------------


def test_postgres_uri_names_a_driver_this_sqlalchemy_has() -> None:
    major = int(sqlalchemy.__version__.split(".")[0])
    assert (major >= 2) == compat.SQLALCHEMY_2
    assert compat.postgres_driver() == ("psycopg" if major >= 2 else "psycopg2")
    engine = create_engine(compat.postgres_uri("postgres@127.0.0.1:5432/test"))
    try:
        assert engine.dialect.driver == compat.postgres_driver()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()
    assert PG_URI.startswith("postgresql+") or "ENGINEHOUSE_TEST_PG" in PG_URI


def test_a_sqlite_file_gets_a_queue_pool_on_both_stacks(tmp_path: Path) -> None:
    url = make_url(f"sqlite:///{tmp_path / 'x.db'}")
    kwargs = compat.pool_defaults_of_sqlalchemy_2(url, {"pool_size": 2})
    engine = create_engine(url, **kwargs)
    try:
        assert type(engine.pool) is QueuePool and engine.pool.size() == 2
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("uri", "kwargs"),
    [
        ("sqlite://", {}),
        ("sqlite:///file.db", {"poolclass": NullPool}),
        ("postgresql://u@h/db", {"pool_size": 3}),
    ],
)
def test_other_engines_keep_their_arguments(uri: str, kwargs: dict[str, Any]) -> None:
    assert compat.pool_defaults_of_sqlalchemy_2(make_url(uri), kwargs) == kwargs


# -- events -----------------------------------------------------------------------------------


def test_a_dispose_listener_leaves_statements_event_free() -> None:
    engine = create_engine(PG_URI)
    before = engine._has_events
    disposed: list[object] = []
    compat.listen_off_the_statement_path(engine, "engine_disposed", disposed.append)
    assert engine._has_events is before is False  # what the function is for
    engine.dispose()
    assert disposed == [engine]


# -- the creator ------------------------------------------------------------------------------


def test_wrap_connect_wraps_this_pool_only() -> None:
    calls: list[Any] = []
    pool = QueuePool(sqlite_creator, pool_size=1)
    compat.wrap_connect(pool, counting(calls))
    pool.connect().close()
    assert len(calls) == 1 and calls[0] is not None  # the connection record
    fresh = pool.recreate()
    fresh.connect().close()
    assert len(calls) == 1
    pool.dispose()
    fresh.dispose()


def test_wrap_creator_reaches_the_recreated_pool() -> None:
    calls: list[Any] = []
    pool = NullPool(sqlite_creator)
    compat.wrap_creator(pool, counting(calls))
    pool.connect().close()
    pool.recreate().connect().close()
    assert len(calls) == 2


# -- QueuePool's counters ---------------------------------------------------------------------


def test_a_counting_pool_counts_every_connection_against_one_limit() -> None:
    pool = QueuePool(sqlite_creator, pool_size=1, max_overflow=0, timeout=5)
    compat.count_connections(pool, 2)
    assert (compat.connection_limit(pool), compat.connection_count(pool)) == (2, 0)
    first, second = pool.connect(), pool.connect()  # pool_size 1 no longer bounds it
    assert compat.connection_count(pool) == 2 and pool.checkedout() == 2
    assert compat.reserve_connection(pool) is False  # at the limit
    first.close()
    second.close()
    assert compat.idle_count(pool) == 2  # the queue kept both (it is unbounded now)
    compat.set_connection_limit(pool, 3)
    assert compat.reserve_connection(pool) is True
    assert compat.connection_count(pool) == 3
    compat.forget_connection(pool)
    assert compat.connection_count(pool) == 2
    pool.dispose()


def test_idle_records_can_be_taken_and_put_back() -> None:
    pool = QueuePool(sqlite_creator, pool_size=2, max_overflow=0)
    compat.count_connections(pool, 2)
    assert compat.take_idle(pool) is None
    pool.connect().close()
    record = compat.take_idle(pool)
    assert record is not None and record.dbapi_connection is not None
    assert compat.idle_count(pool) == 0
    compat.put_idle(pool, record)
    assert compat.idle_count(pool) == 1
    pool.dispose()


def test_an_empty_record_connects_when_checked_out() -> None:
    calls: list[Any] = []
    pool = QueuePool(sqlite_creator, pool_size=1, max_overflow=0)
    compat.count_connections(pool, 1)
    compat.wrap_connect(pool, counting(calls))
    assert compat.reserve_connection(pool)
    record = compat.empty_record(pool)
    assert record.dbapi_connection is None and calls == []
    compat.put_idle(pool, record)
    connection = pool.connect()  # (1.4's pooled connection is no context manager)
    cursor = connection.cursor()
    cursor.execute("SELECT 1")
    assert cursor.fetchone() == (1,)
    connection.close()
    assert len(calls) == 1 and compat.connection_count(pool) == 1
    pool.dispose()


def test_the_template_methods_we_override_exist_on_queue_pool() -> None:
    for name in compat.POOL_TEMPLATE_METHODS:
        assert callable(getattr(QueuePool, name)), name
        assert name in vars(BudgetedQueuePool), name


# -- pykka ------------------------------------------------------------------------------------


class Idle(pykka.ThreadingActor):
    pass


def test_forget_all_actors_empties_the_registry_and_keeps_it_usable() -> None:
    before = Idle.start()
    try:
        compat.forget_all_actors()
        assert pykka.ActorRegistry.get_all() == []
        after = Idle.start()  # registers under the fresh lock
        assert pykka.ActorRegistry.get_all() == [after]
        after.stop()
        assert pykka.ActorRegistry.get_all() == []
    finally:
        before.stop()  # unregistering an actor the registry forgot is harmless


def test_singleton_pools_are_not_queue_pools() -> None:
    """The plan's rule relies on it: only exact QueuePools become budgeted."""
    assert not issubclass(SingletonThreadPool, QueuePool)
    assert issubclass(BudgetedQueuePool, QueuePool)
