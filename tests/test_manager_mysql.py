"""The facade on the machine's MariaDB: the schema is the database."""

from __future__ import annotations

import os

import pymysql
import pytest
from sqlalchemy import pool as sa_pool
from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.errors import InvalidSpecError

pytestmark = pytest.mark.services("mariadb")

MYSQL_URI = os.environ.get("ENGINEHOUSE_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")
SCHEMA = "enginehouse_schema"


@pytest.fixture(scope="module", autouse=True)
def mysql_schema() -> None:
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True)
    try:
        with conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE IF NOT EXISTS {SCHEMA}")
    finally:
        conn.close()


def spec(**kw: object) -> DatabaseSpec:
    return DatabaseSpec.model_validate({"id": 201, "uri": MYSQL_URI, **kw})


def current_database(manager: EngineManager, db: DatabaseSpec, **request: str) -> object:
    with manager.connect(db, **request) as conn:
        return conn.execute(text("select database()")).scalar()


def test_same_inputs_same_engine(manager: EngineManager) -> None:
    db = spec()
    assert manager.get(db) is manager.get(db)
    assert current_database(manager, db) == "test"


def test_schema_is_the_database(manager: EngineManager) -> None:
    db = spec()
    default = manager.get(db)
    other = manager.get(db, schema=SCHEMA)
    assert other is not default
    assert manager.get(db, schema=SCHEMA) is other
    assert current_database(manager, db, schema=SCHEMA) == SCHEMA
    assert current_database(manager, db) == "test"


def test_no_catalog_on_mysql(manager: EngineManager) -> None:
    with pytest.raises(InvalidSpecError) as info:
        manager.get(spec(), catalog="x")
    assert info.value.field == "catalog"


def test_impersonation_changes_the_engine(manager: EngineManager) -> None:
    assert manager.get(spec(), user="a") is manager.get(spec(), user="b")
    impersonating = spec(impersonate_user=True)
    root = manager.get(impersonating, user="root")
    assert root is not manager.get(impersonating, user="someone")
    with root.connect() as conn:
        assert str(conn.execute(text("select current_user()")).scalar()).startswith("root@")


def test_pool_arguments_and_class(manager: EngineManager) -> None:
    queue = manager.get(spec(extra={"engine_params": {"pool_size": 3}}))
    assert isinstance(queue.pool, sa_pool.QueuePool) and queue.pool.size() == 3
    null = manager.get(spec(extra={"engine_params": {"poolclass": "null"}}))
    assert isinstance(null.pool, sa_pool.NullPool)


def test_new_mode(new_manager: EngineManager) -> None:
    db = spec()
    assert new_manager.get(db) is not new_manager.get(db)
    assert current_database(new_manager, db, schema=SCHEMA) == SCHEMA
