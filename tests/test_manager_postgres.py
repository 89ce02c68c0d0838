"""The facade on the machine's PostgreSQL: keys, catalog, schema, impersonation, pools, leaks."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from conftest import PG_URI
from sqlalchemy import pool as sa_pool
from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager

pytestmark = pytest.mark.services("postgres")

CATALOG = "enginehouse_cat"
SCHEMAS = ("enginehouse_s1", "enginehouse_s2")
ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def admin(sql: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture(scope="module", autouse=True)
def pg_objects() -> None:
    """Schemas and a second database, created idempotently."""
    for schema in SCHEMAS:
        admin(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    if not admin("SELECT 1 FROM pg_database WHERE datname = %s", CATALOG):
        with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # a concurrent run made it
            admin(f"CREATE DATABASE {CATALOG}")


def spec(**kw: object) -> DatabaseSpec:
    return DatabaseSpec.model_validate({"id": 101, "uri": PG_URI, **kw})


def test_same_inputs_same_engine_and_select(manager: EngineManager) -> None:
    db = spec()
    engine = manager.get(db)
    assert manager.get(db) is engine
    with manager.connect(db) as conn:
        assert conn.execute(text("select 1")).scalar() == 1


def test_schema_lands_in_search_path(manager: EngineManager) -> None:
    db = spec()
    one = manager.get(db, schema=SCHEMAS[0])
    two = manager.get(db, schema=SCHEMAS[1])
    assert one is not two
    assert manager.get(db, schema=SCHEMAS[0]) is one
    with manager.connect(db, schema=SCHEMAS[0]) as conn:
        assert conn.execute(text("select current_schema()")).scalar() == SCHEMAS[0]
        assert SCHEMAS[0] in str(conn.execute(text("show search_path")).scalar())
    with two.connect() as conn:
        assert conn.execute(text("select current_schema()")).scalar() == SCHEMAS[1]


def test_catalog_is_the_database_name(manager: EngineManager) -> None:
    db = spec()
    default = manager.get(db)
    other = manager.get(db, catalog=CATALOG)
    assert other is not default
    with manager.connect(db, catalog=CATALOG) as conn:
        assert conn.execute(text("select current_database()")).scalar() == CATALOG
    with default.connect() as conn:
        assert conn.execute(text("select current_database()")).scalar() == "test"


def test_impersonation_makes_the_user_part_of_the_key(manager: EngineManager) -> None:
    plain = spec()
    assert manager.get(plain, user="alice") is manager.get(plain, user="bob")
    impersonating = spec(impersonate_user=True)
    alice = manager.get(impersonating, user="alice")
    bob = manager.get(impersonating, user="bob")
    assert alice is not bob
    assert manager.get(impersonating, user="alice") is alice
    assert (alice.url.username, bob.url.username) == ("alice", "bob")
    # The impersonated user really connects as itself (the trust role exists: postgres).
    as_postgres = manager.get(impersonating, user="postgres")
    with as_postgres.connect() as conn:
        assert conn.execute(text("select current_user")).scalar() == "postgres"


def test_default_pool_is_queue_pool_with_arguments(manager: EngineManager) -> None:
    db = spec(extra={"engine_params": {"pool_size": 4, "max_overflow": 1, "pool_timeout": 5}})
    pool = manager.get(db).pool
    assert isinstance(pool, sa_pool.QueuePool)
    assert pool.size() == 4
    assert pool._max_overflow == 1  # no public accessor
    assert pool._timeout == 5


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("queue", sa_pool.QueuePool),
        ("singleton", sa_pool.SingletonThreadPool),
        ("assertion", sa_pool.AssertionPool),
        ("null", sa_pool.NullPool),
        ("static", sa_pool.StaticPool),
    ],
)
def test_pool_class_from_extra(
    manager: EngineManager, name: str, expected: type[sa_pool.Pool]
) -> None:
    db = spec(extra={"engine_params": {"poolclass": name}})
    engine = manager.get(db)
    assert type(engine.pool) is expected
    with engine.connect() as conn:
        assert conn.execute(text("select 1")).scalar() == 1


def test_new_mode_uses_nullpool_and_connect_disposes(new_manager: EngineManager) -> None:
    db = spec(extra={"engine_params": {"pool_size": 5}})
    first = new_manager.get(db)
    assert first is not new_manager.get(db)
    assert isinstance(first.pool, sa_pool.NullPool)
    with new_manager.connect(db, schema=SCHEMAS[0]) as conn:
        assert conn.execute(text("select current_schema()")).scalar() == SCHEMAS[0]


def app_connections(name: str) -> int:
    rows = admin("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", name)
    return int(rows[0][0])  # type: ignore[call-overload]


def test_no_thread_or_connection_left_after_shutdown(poll: Callable[..., object]) -> None:
    name = f"enginehouse-leak-{uuid.uuid4().hex[:8]}"
    db = spec(extra={"engine_params": {"connect_args": {"application_name": name}}})
    before = set(threading.enumerate())
    manager = EngineManager(cleanup_interval=0.05, ask_timeout=10)
    held = []
    for schema in (None, *SCHEMAS):
        engine = manager.get(db, schema=schema)
        held.append(engine.connect())  # checked out
        with engine.connect() as conn:  # and checked back in
            conn.execute(text("select 1"))
    for conn in held:
        conn.close()
    assert app_connections(name) >= 3
    manager.shutdown()
    poll(lambda: set(threading.enumerate()) <= before, what="every actor/timer thread to end")
    poll(lambda: app_connections(name) == 0, what="pg_stat_activity to lose our connections")


@pytest.fixture
def leak_name() -> Iterator[str]:
    yield f"enginehouse-new-{uuid.uuid4().hex[:8]}"


def test_new_mode_leaves_no_connection(leak_name: str, poll: Callable[..., object]) -> None:
    db = spec(extra={"engine_params": {"connect_args": {"application_name": leak_name}}})
    with EngineManager(mode="new", cleanup_interval=60) as manager:
        for _ in range(3):
            with manager.connect(db) as conn:
                conn.execute(text("select 1"))
        manager.get(db).connect().close()  # an engine nobody disposed: shutdown does
    poll(lambda: app_connections(leak_name) == 0, what="NEW-mode connections to close")


def test_dispose_covers_every_schema_and_user_and_stats_show_pools(
    manager: EngineManager,
) -> None:
    db = spec(impersonate_user=True, extra={"engine_params": {"pool_size": 3}})
    engines = [
        manager.get(db, user="postgres"),
        manager.get(db, user="postgres", schema=SCHEMAS[0]),
        manager.get(db, user="postgres", catalog=CATALOG),
    ]
    with engines[1].connect():
        status = next(e for e in manager.stats().engines if e.schema_name == SCHEMAS[0])
        assert (status.pool_class, status.size, status.checked_out) == ("QueuePool", 3, 1)
        assert status.user == "postgres" and "postgres" in status.url
    assert manager.stats().engine_count == 3
    assert manager.dispose(db.id) == 3
    assert manager.stats().engine_count == 0
    assert all(manager.get(db, user="postgres") is not e for e in engines[:1])


def test_a_full_pool_times_out_with_our_error(manager: EngineManager) -> None:
    from enginehouse.errors import PoolExhaustedError

    spec = DatabaseSpec(id=1703, uri=PG_URI, extra={"engine_params": {
        "pool_size": 1, "max_overflow": 0, "pool_timeout": 0.1}})
    with (
        manager.connect(spec),
        pytest.raises(PoolExhaustedError, match="database 1703: QueuePool limit"),
        manager.connect(spec),
    ):
        pass


def test_a_refused_connect_is_our_error_without_the_password(manager: EngineManager) -> None:
    from enginehouse.errors import ConnectFailedError

    secret = "Refused-pw-4242"
    spec = DatabaseSpec(id=1704, uri=f"postgresql://postgres:{secret}@127.0.0.1:9/test")
    with pytest.raises(ConnectFailedError) as info, manager.connect(spec):
        pass
    message = str(info.value)
    assert message.startswith("database 1704: connect failed (OperationalError):")
    assert info.value.driver_error == "OperationalError"
    assert secret not in message and info.value.__cause__ is None
