"""Connection budgets without a server: one process, every engine of a database (issue 5)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fleet_fixtures import PgSampler, budget_of, pg_spec_dict, unique
from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.errors import ConfigurationError, InvalidSpecError, PoolExhaustedError

pytestmark = pytest.mark.services("postgres", "redis")


@pytest.fixture
def budget_manager() -> Iterator[EngineManager]:
    with EngineManager(cleanup_interval=60, ask_timeout=10, forbid_unsafe_uris=False) as manager:
        yield manager


def spec(application_name: str, cap: int, **engine_params: Any) -> DatabaseSpec:
    return DatabaseSpec(**pg_spec_dict(unique("db"), application_name, cap, **engine_params))


def test_cap_holds_across_catalogs_schemas_and_threads(budget_manager: EngineManager) -> None:
    """8 threads over 3 schema-specific engines of one database never exceed its cap of 3."""
    app = unique("eh-embedded")
    database = spec(app, 3, pool_size=5, max_overflow=10)
    done: list[int] = []

    def work(schema: str) -> None:
        count = 0
        for _ in range(25):
            with budget_manager.connect(database, schema=schema) as connection:
                connection.execute(text("SELECT pg_sleep(0.002)"))
            count += 1
        done.append(count)

    schemas = ["public", "information_schema", "pg_catalog"]
    threads = [threading.Thread(target=work, args=(schemas[i % 3],)) for i in range(8)]
    with PgSampler(app) as sampler:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert done == [25] * 8
    assert len(sampler.samples) > 10
    assert 1 <= sampler.peak <= 3
    budget = budget_of(budget_manager, database)
    assert budget.cap == 3 and budget.mode == "local" and budget.held <= 3
    assert budget.timeouts == 0


def test_pooled_queries_cost_no_permit(budget_manager: EngineManager) -> None:
    database = spec(unique("eh-embedded"), 4)
    engine = budget_manager.get(database)
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    granted = budget_of(budget_manager, database).granted
    for _ in range(200):
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    assert budget_of(budget_manager, database).granted == granted == 1


def test_waiter_gets_pool_exhausted_after_pool_timeout(budget_manager: EngineManager) -> None:
    database = spec(unique("eh-embedded"), 2, pool_timeout=0.3)
    engine = budget_manager.get(database)
    held = [engine.connect() for _ in range(2)]
    other = budget_manager.get(database, schema="information_schema")
    with pytest.raises(PoolExhaustedError, match=f"db:{database.id}.*pool_timeout"):
        other.connect()
    for connection in held:
        connection.close()
    with other.connect() as connection:  # the idle ones give their permits back
        assert connection.execute(text("SELECT 1")).scalar() == 1
    budget = budget_of(budget_manager, database)
    assert budget.timeouts == 1 and budget.held <= 2


def test_idle_connections_give_their_permit_to_a_waiter(budget_manager: EngineManager) -> None:
    app = unique("eh-embedded")
    database = spec(app, 2)
    first = budget_manager.get(database)
    connections = [first.connect() for _ in range(2)]
    for connection in connections:
        connection.close()  # both idle in first's pool, still holding their permits
    sampler = PgSampler(app)
    assert sampler.now() == 2
    second = budget_manager.get(database, schema="information_schema")
    with second.connect() as connection:
        assert connection.execute(text("SELECT 1")).scalar() == 1
        assert sampler.now() == 2
    assert budget_of(budget_manager, database).shed >= 1


def test_waiters_are_served_first_come_first_served(poll: Any) -> None:
    """Tunnel permits (``max_tunnels_per_bastion``) use the same keeper and queue."""
    with EngineManager(max_tunnels_per_bastion=1, cleanup_interval=60) as manager:
        budgets = manager._budgets
        first = budgets.hold_tunnel("user@bastion:22", timeout=10)
        assert first is not None
        order: list[int] = []

        def wait(index: int) -> None:
            lease = budgets.hold_tunnel("user@bastion:22", timeout=20)
            assert lease is not None
            order.append(index)
            budgets.release(lease)

        threads = []
        for index in range(3):
            thread = threading.Thread(target=wait, args=(index,))
            thread.start()
            threads.append(thread)
            poll(
                lambda n=index + 1: _waiting(manager, "ssh:user@bastion:22") == n,
                what=f"{index + 1} waiters queued",
            )
        budgets.release(first)
        for thread in threads:
            thread.join(timeout=30)
        assert order == [0, 1, 2]
    with EngineManager(cleanup_interval=60) as uncapped:
        assert uncapped._budgets.hold_tunnel("user@bastion:22", timeout=1) is None


def _waiting(manager: EngineManager, key: str) -> int:
    return next((b.waiting for b in manager.stats().budgets if b.key == key), 0)


def test_default_max_connections_applies_without_extra() -> None:
    app = unique("eh-embedded")
    database = DatabaseSpec(
        id=unique("db"),
        uri=pg_spec_dict(0, app, 1)["uri"],
        extra={"engine_params": {"connect_args": {"application_name": app}, "pool_timeout": 0.2}},
    )
    with EngineManager(default_max_connections=1, cleanup_interval=60) as manager:
        engine = manager.get(database)
        with engine.connect(), pytest.raises(PoolExhaustedError):
            engine.connect()
        assert budget_of(manager, database).cap == 1


@pytest.mark.parametrize("cap", [0, -3, "6", 2.5, True])
def test_bad_cap_names_the_field(cap: object) -> None:
    with pytest.raises(InvalidSpecError) as caught:
        DatabaseSpec(id=1, uri="postgresql+psycopg://h/db", extra={"max_connections": cap})
    assert caught.value.field == "extra.max_connections"


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"default_max_connections": 0}, "default_max_connections"),
        ({"max_tunnels_per_bastion": -1}, "max_tunnels_per_bastion"),
        ({"fleet_url": "http://127.0.0.1:6379"}, "fleet_url"),
        ({"fleet_url": "redis://:s3cr3t-pw@127.0.0.1:99999/0"}, "fleet_url"),
        ({"fleet_url": "redis:///0"}, "fleet_url"),
        ({"fleet_url": "redis://127.0.0.1:6379", "fleet_fallback": "open"}, "fleet_fallback"),
        ({"fleet_url": "redis://127.0.0.1:6379", "fleet_lease_ttl": 10}, "fleet_lease_ttl"),
    ],
)
def test_bad_settings_name_the_field(values: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        EngineManager(**values)
    assert caught.value.field == field
    assert "s3cr3t-pw" not in str(caught.value)


def test_unreachable_fleet_url_fails_closed_at_start() -> None:
    port = _closed_port()
    with pytest.raises(ConfigurationError) as caught:
        EngineManager(fleet_url=f"redis://:s3cr3t-pw@127.0.0.1:{port}/0", cleanup_interval=1)
    assert caught.value.field == "fleet_url"
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "s3cr3t-pw" not in str(caught.value)


def test_unreachable_fleet_url_starts_with_local_fallback(caplog: pytest.LogCaptureFixture) -> None:
    port = _closed_port()
    with EngineManager(
        fleet_url=f"redis://127.0.0.1:{port}/0", fleet_fallback="local", cleanup_interval=1
    ) as manager:
        database = spec(unique("eh-embedded"), 2)
        with manager.connect(database) as connection:
            assert connection.execute(text("SELECT 1")).scalar() == 1
        assert budget_of(manager, database).mode == "fleet-fallback"
    assert any("local" in record.getMessage() for record in caplog.records)


def _closed_port() -> int:
    from fleet_fixtures import free_port

    return free_port()  # bound then released: nothing listens there
