"""The create_engine hook against real PostgreSQL, called the way Superset 6.1 calls it.

``SupersetCore`` below has the two things of ``superset.models.core`` that the
hook touches: a module global ``create_engine`` and a ``Database`` whose
``_get_sqla_engine`` builds the final arguments as Superset's does (extra's
engine_params, NullPool forced when ``nullpool``, then ``create_engine``).
"""

from __future__ import annotations

import contextlib
import enum
import json
import types
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import PG_URI
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import Engine, make_url

from enginehouse import EngineManager
from enginehouse.budgeted_pool import BudgetedQueuePool
from enginehouse.errors import InvalidSpecError
from enginehouse.integrations.superset.engine_hook import REQUEST, EngineHook, patch, source_name
from enginehouse.shares import request_source

PASSWORD = "hook-pw-5173"


class QuerySource(enum.Enum):
    """superset.utils.core.QuerySource (6.1)."""

    CHART = 0
    DASHBOARD = 1
    SQL_LAB = 2


def make_core() -> types.SimpleNamespace:
    """A fresh stand-in for ``superset.models.core`` (its call shape, nothing more)."""
    core = types.SimpleNamespace(create_engine=create_engine)

    class Database:
        def __init__(self, id: int | None, extra: dict[str, Any] | None = None, uri: str = PG_URI):
            self.id = id
            self.sqlalchemy_uri_decrypted = uri
            self.extra = json.dumps(extra or {})
            self.encrypted_extra = None
            self.impersonate_user = False
            self.ssh_tunnel = None

        def _get_sqla_engine(
            self,
            catalog: str | None = None,
            schema: str | None = None,
            nullpool: bool = True,
            source: Any = None,
            sqlalchemy_uri: str | None = None,
        ) -> Engine:
            url = make_url(sqlalchemy_uri or self.sqlalchemy_uri_decrypted)
            kwargs = json.loads(self.extra).get("engine_params", {})
            if nullpool:
                kwargs["poolclass"] = pool.NullPool
            connect_args = kwargs.setdefault("connect_args", {})
            if schema:  # as PostgresEngineSpec.adjust_engine_params
                connect_args["options"] = f"-csearch_path={schema}"
            return core.create_engine(url, **kwargs)

        @contextlib.contextmanager
        def get_sqla_engine(
            self,
            catalog: str | None = None,
            schema: str | None = None,
            nullpool: bool = True,
            source: Any = None,
        ) -> Iterator[Engine]:
            yield self._get_sqla_engine(catalog, schema, nullpool, source)

    core.Database = Database
    return core


@pytest.fixture(params=["singleton", "new"])
def hooked(request: pytest.FixtureRequest) -> Iterator[tuple[types.SimpleNamespace, EngineManager]]:
    with EngineManager(mode=request.param, cleanup_interval=60, ask_timeout=10) as manager:
        core = make_core()
        patch(core, EngineHook(lambda: manager))
        yield core, manager


def backend_pid(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("select pg_backend_pid()")).scalar_one())


def test_singleton_hands_out_one_pooled_engine_per_database(hooked: Any) -> None:
    core, manager = hooked
    database = core.Database(31, {"engine_params": {"pool_size": 3}})  # fine for NullPool too
    engines = [database._get_sqla_engine() for _ in range(20)]
    if manager.settings.mode == "new":
        assert len({id(e) for e in engines}) == 20
        assert all(isinstance(e.pool, pool.NullPool) for e in engines)
        assert manager.stats().uncached_created == 20
        return
    assert len({id(e) for e in engines}) == 1
    assert isinstance(engines[0].pool, pool.QueuePool)  # not the NullPool Superset forced
    pids = {backend_pid(engine) for engine in engines}
    assert len(pids) == 1  # one server session served all twenty
    assert manager.stats().engine_count == 1


def test_schemas_get_pools_of_their_own(hooked: Any) -> None:
    core, manager = hooked
    database = core.Database(32)
    sales = database._get_sqla_engine(schema="sales")
    public = database._get_sqla_engine(schema="public")
    assert sales is not public
    with sales.connect() as connection:
        assert connection.execute(text("show search_path")).scalar_one() == "sales"
    if manager.settings.mode == "new":  # Superset's behaviour: a new engine per call, none cached
        assert sales is not database._get_sqla_engine(schema="sales")
        assert manager.stats().engines == []
        return
    assert sales is database._get_sqla_engine(schema="sales")
    stats = {engine.schema_name for engine in manager.stats().engines}
    assert stats == {"sales", "public"}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"engine_params": {"poolclass": "static"}}, pool.StaticPool),
        ({"poolclass": "singleton"}, pool.SingletonThreadPool),  # the seed's top-level key
        ({"engine_params": {"pool_size": 2, "max_overflow": 1}}, pool.QueuePool),
    ],
)
def test_singleton_uses_the_pool_the_extra_names(extra: dict[str, Any], expected: type) -> None:
    with EngineManager(mode="singleton", cleanup_interval=60) as manager:
        core = make_core()
        patch(core, EngineHook(lambda: manager))
        engine = core.Database(33, extra)._get_sqla_engine()
        assert type(engine.pool) is expected
        assert backend_pid(engine) > 0


def test_an_unknown_pool_name_names_the_field() -> None:
    with EngineManager(mode="singleton", cleanup_interval=60) as manager:
        core = make_core()
        patch(core, EngineHook(lambda: manager))
        with pytest.raises(InvalidSpecError, match=r"extra\.poolclass"):
            core.Database(34, {"poolclass": "fancy"})._get_sqla_engine()


def test_a_changed_password_retires_the_old_engine() -> None:
    with EngineManager(mode="singleton", cleanup_interval=60) as manager:
        core = make_core()
        patch(core, EngineHook(lambda: manager))
        first = core.Database(35)._get_sqla_engine()
        changed = core.Database(35, uri=PG_URI.replace("://postgres@", f"://postgres:{PASSWORD}@"))
        second = changed._get_sqla_engine()
        assert second is not first
        assert manager.stats().engine_count == 1  # the old version was disposed
        assert backend_pid(second) > 0  # trust auth: the password is not checked


def test_a_cap_from_the_extra_bounds_the_pool() -> None:
    with EngineManager(mode="singleton", cleanup_interval=60) as manager:
        core = make_core()
        patch(core, EngineHook(lambda: manager))
        engine = core.Database(36, {"max_connections": 2})._get_sqla_engine()
        assert backend_pid(engine) > 0
        assert isinstance(engine.pool, BudgetedQueuePool)  # the budget's pool class
        budgets = {budget.key: budget.cap for budget in manager.stats().budgets}
        assert budgets.get("db:36") == 2


def test_unsaved_databases_keep_superset_nullpool(hooked: Any) -> None:
    core, _manager = hooked
    extra = {"max_connections": 3, "engine_params": {"pool_size": 2, "max_overflow": 1}}
    engine = core.Database(None, extra)._get_sqla_engine()  # a connection test
    assert isinstance(engine.pool, pool.NullPool)  # nothing stays open after the test
    assert backend_pid(engine) > 0


def test_calls_from_outside_get_sqla_engine_are_left_alone(hooked: Any) -> None:
    core, manager = hooked
    assert REQUEST.get() is None
    engine = core.create_engine(make_url(PG_URI), poolclass=pool.NullPool)
    try:
        assert manager.stats().engine_count == 0
        assert manager.stats().uncached_created == 0
        assert backend_pid(engine) > 0
    finally:
        engine.dispose()


def test_patching_twice_wraps_once(hooked: Any) -> None:
    core, manager = hooked
    wrapped = core.Database._get_sqla_engine
    patch(core, EngineHook(lambda: manager))
    assert core.Database._get_sqla_engine is wrapped


def test_a_pooled_connection_the_server_ended_is_replaced(hooked: Any, poll: Any) -> None:
    core, _manager = hooked
    database = core.Database(36)
    engine = database._get_sqla_engine()
    ended = backend_pid(engine)
    killer = create_engine(make_url(PG_URI), poolclass=pool.NullPool)
    with killer.connect() as connection:
        connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": ended})

        def gone() -> bool:
            query = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
            return connection.execute(query, {"pid": ended}).scalar_one() == 0

        poll(gone, what="the backend to end")
    killer.dispose()
    again = database._get_sqla_engine()
    assert backend_pid(again) != ended  # SINGLETON: pre-ping replaced the dead pooled connection


def test_connection_shares_in_the_extra_shape_the_pool_and_see_the_source() -> None:
    extra = {"max_connections": 2, "connection_shares": {"DASHBOARD": 3, "SQL_LAB": 1}}
    with EngineManager(mode="singleton", cleanup_interval=60) as manager:
        core = make_core()
        patch(core, EngineHook(lambda: manager))
        database = core.Database(37, extra)
        with database.get_sqla_engine(source=QuerySource.SQL_LAB) as engine:
            assert isinstance(engine.pool, BudgetedQueuePool)
            assert engine.pool.fair is not None
            assert engine.pool.fair.weights["DASHBOARD"] == 3
            with engine.connect():
                assert engine.pool.fair.checked_out()["SQL_LAB"] == 1
        assert request_source.get() is None  # the source ends with the block
        with database.get_sqla_engine() as engine, engine.connect():  # no source: the "*" share
            assert engine.pool.fair.checked_out()["*"] == 1


def test_source_names_follow_superset_query_source() -> None:
    assert source_name(QuerySource.DASHBOARD) == "DASHBOARD"
    assert source_name("CHART") == "CHART"
    assert source_name(None) is None  # outside Superset: no referrer to guess from


def test_bad_connection_shares_name_the_field() -> None:
    with EngineManager(mode="singleton", cleanup_interval=60) as manager:
        core = make_core()
        patch(core, EngineHook(lambda: manager))
        database = core.Database(38, {"connection_shares": {"DASHBOARD": -1}})
        with pytest.raises(InvalidSpecError, match=r"extra\.connection_shares\.DASHBOARD"):
            database._get_sqla_engine()


def test_the_flask_shim_takes_the_hooks_path_for_a_superset_model() -> None:
    """``integrations.flask.get_sqla_engine(database)`` on a hooked Superset model: its own
    ``get_sqla_engine`` (Superset's steps), the same cached engine as the model's call."""
    from flask import Flask

    from enginehouse.integrations.flask import EngineManagerExtension, get_sqla_engine
    from enginehouse.integrations.superset.install import installed_state
    from enginehouse.settings import ManagerSettings

    app = Flask(__name__)
    EngineManagerExtension().init_app(app, ManagerSettings(mode="singleton", cleanup_interval=60))
    state = installed_state(app)
    core = make_core()
    patch(core, EngineHook(state.running))
    database = core.Database(39)
    try:
        with app.app_context():
            with get_sqla_engine(database, schema="sales") as engine:
                assert engine is database._get_sqla_engine(schema="sales")
                with engine.connect() as connection:
                    assert connection.execute(text("show search_path")).scalar_one() == "sales"
            assert state.running().stats().engine_count == 1
    finally:
        state.shutdown()
