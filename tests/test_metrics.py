"""Metrics scraped over HTTP from a real manager holding real PostgreSQL connections."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy
from conftest import PG_URI
from prometheus_client.parser import text_string_to_metric_families
from secret_scan import assert_no_secret, register_secret

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.errors import PoolExhaustedError
from enginehouse.integrations.metrics import (
    MetricsServer,
    disable_pool_events,
    registry_for,
    start_metrics_server,
)

pytestmark = pytest.mark.services("postgres", "redis")

PG_HOST_URI = PG_URI
PASSWORD = "s3cr3t-pw"  # trust auth ignores it; it must still never show up in metrics
register_secret(PASSWORD)


@pytest.fixture(autouse=True)
def _pool_events_off_afterwards() -> Iterator[None]:
    """Metrics enable process-wide checkout timers: switch them off for the next tests."""
    yield
    disable_pool_events()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read().decode()
    assert_no_secret(body, what="metrics page")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def db(database: str) -> tuple[tuple[str, str], ...]:
    return (("database", database),)


@pytest.fixture
def served() -> Iterator[tuple[EngineManager, MetricsServer]]:
    with EngineManager(mode="singleton", cleanup_interval=60, ask_timeout=10) as manager:
        server = start_metrics_server(manager, port=0)
        try:
            yield manager, server
        finally:
            server.stop()


def test_pool_gauges_and_counters_over_http(served: tuple[EngineManager, MetricsServer]) -> None:
    manager, server = served
    spec = DatabaseSpec(
        id=301,
        uri=PG_HOST_URI.replace("postgres@", f"postgres:{PASSWORD}@"),
        extra={"engine_params": {"pool_size": 3, "max_overflow": 2}},
    )
    engine = manager.get(spec)
    with ExitStack() as held:
        for _ in range(2):
            held.enter_context(engine.connect()).execute(sqlalchemy.text("SELECT 1"))
        busy = scrape(server.url)
    idle = scrape(server.url)

    assert busy[("enginehouse_up", ())] == 1
    assert busy[("enginehouse_engines", db("301"))] == 1
    assert busy[("enginehouse_pool_size", db("301"))] == 3
    assert busy[("enginehouse_pool_checked_out", db("301"))] == 2
    assert idle[("enginehouse_pool_checked_out", db("301"))] == 0
    assert idle[("enginehouse_pool_checked_in", db("301"))] == 2
    assert idle[("enginehouse_engine_creations_total", ())] == 1
    assert idle[("enginehouse_cache_misses_total", ())] == 1
    assert idle[("enginehouse_pool_wait_seconds_count", db("301"))] == 2
    assert idle[("enginehouse_pool_usage_seconds_count", db("301"))] == 2
    assert idle[("enginehouse_pool_connections_opened_total", db("301"))] == 2
    assert idle[("enginehouse_actor_up", (("actor", "registry"),))] == 1
    assert idle[("enginehouse_actor_restarts_total", (("actor", "janitor"),))] == 0

    assert manager.dispose(301) == 1
    after = scrape(server.url)
    assert after[("enginehouse_engine_disposals_total", ())] == 1
    assert ("enginehouse_engines", db("301")) not in after


def test_checkout_timeout_is_counted(served: tuple[EngineManager, MetricsServer]) -> None:
    manager, server = served
    spec = DatabaseSpec(
        id=302,
        uri=PG_HOST_URI,
        extra={"engine_params": {"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2}},
    )
    engine = manager.get(spec)
    with engine.connect(), pytest.raises(sqlalchemy.exc.TimeoutError):
        engine.connect()
    samples = scrape(server.url)
    assert samples[("enginehouse_pool_timeouts_total", db("302"))] == 1
    assert samples[("enginehouse_pool_wait_seconds_count", db("302"))] == 2


def test_budget_exhaustion_is_counted_as_a_timeout() -> None:
    spec = DatabaseSpec(id=304, uri=PG_HOST_URI, extra={"engine_params": {"pool_timeout": 0.2}})
    with EngineManager(cleanup_interval=60, default_max_connections=1) as manager:
        registry = registry_for(manager)
        engine = manager.get(spec)
        with engine.connect(), pytest.raises(PoolExhaustedError):
            engine.connect()
        assert (
            registry.get_sample_value("enginehouse_pool_timeouts_total", {"database": "304"}) == 1
        )
        budget = {"budget": "db:304"}
        assert registry.get_sample_value("enginehouse_budget_cap", budget) == 1


def test_pending_checkouts_are_visible_while_they_wait(
    served: tuple[EngineManager, MetricsServer],
) -> None:
    manager, server = served
    spec = DatabaseSpec(
        id=305,
        uri=PG_HOST_URI,
        extra={"engine_params": {"pool_size": 1, "max_overflow": 0, "pool_timeout": 60}},
    )
    engine = manager.get(spec)
    label = {"database": "305"}
    held = engine.connect()
    waiter = threading.Thread(target=lambda: engine.connect().close())
    waiter.start()
    try:
        deadline = time.monotonic() + 30
        while server.registry.get_sample_value("enginehouse_pool_pending", label) != 1:
            assert time.monotonic() < deadline, "the waiting checkout never showed as pending"
            time.sleep(0.01)  # polling interval
        assert scrape(server.url)[("enginehouse_pool_pending", db("305"))] == 1
    finally:
        held.close()
        waiter.join(timeout=30)
    assert server.registry.get_sample_value("enginehouse_pool_pending", label) == 0
    assert server.registry.get_sample_value("enginehouse_pool_wait_seconds_count", label) == 2


def test_stopped_endpoint_refuses(served: tuple[EngineManager, MetricsServer]) -> None:
    _, server = served
    assert scrape(server.url)[("enginehouse_up", ())] == 1
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=5)


def test_a_shut_down_manager_reports_down() -> None:
    manager = EngineManager(cleanup_interval=60)
    registry = registry_for(manager, pool_events=False)
    assert registry.get_sample_value("enginehouse_up") == 1
    manager.shutdown()
    assert registry.get_sample_value("enginehouse_up") == 0


def test_tunnel_and_budget_fields_when_present() -> None:
    """Optional parts of stats() (tunnels, fleet budgets) become labelled series."""
    forward = SimpleNamespace(active_channels=2, channel_failures=1)
    stats = SimpleNamespace(
        engines=[],
        actors=[],
        tunnels=[
            SimpleNamespace(
                bastion="ops@10.0.0.5:22",
                state="connected",
                connects=3,
                restarts=2,
                forwards=(forward, forward),
            )
        ],
        budgets=[
            SimpleNamespace(
                key="db:7",
                cap=6,
                mode="fleet",
                held=4,
                waiting=1,
                granted=9,
                timeouts=0,
                shed=2,
                fleet_held=5,
                fleet_waiting=None,
                fleet_processes=2,
                round_trips=11,
                acquire_round_trips=6,
                release_round_trips=2,
                renew_round_trips=3,
                blocking_waits=4,
                empty_waits=1,
                refusals=2,
                handovers=1,
                demand_news=3,
            )
        ],
    )
    registry = registry_for(SimpleNamespace(stats=lambda: stats), pool_events=False)
    bastion = {"bastion": "ops@10.0.0.5:22"}
    assert registry.get_sample_value("enginehouse_tunnel_up", bastion) == 1
    assert registry.get_sample_value("enginehouse_tunnel_restarts_total", bastion) == 2
    assert registry.get_sample_value("enginehouse_tunnel_forwards", bastion) == 2
    assert registry.get_sample_value("enginehouse_tunnel_active_channels", bastion) == 4
    assert (
        registry.get_sample_value("enginehouse_tunnel_state", {**bastion, "state": "connected"})
        == 1
    )
    budget = {"budget": "db:7"}
    assert registry.get_sample_value("enginehouse_budget_cap", budget) == 6
    assert registry.get_sample_value("enginehouse_budget_held", budget) == 4
    assert registry.get_sample_value("enginehouse_budget_granted_total", budget) == 9
    assert registry.get_sample_value("enginehouse_budget_shed_total", budget) == 2
    assert registry.get_sample_value("enginehouse_budget_fleet_held", budget) == 5
    assert registry.get_sample_value("enginehouse_budget_fleet_waiting", budget) is None
    assert registry.get_sample_value("enginehouse_budget_mode", {**budget, "mode": "fleet"}) == 1
    acquire = {**budget, "kind": "acquire"}
    assert registry.get_sample_value("enginehouse_budget_redis_round_trips_total", acquire) == 6
    assert registry.get_sample_value("enginehouse_budget_blocking_waits_total", budget) == 4
    assert registry.get_sample_value("enginehouse_budget_handovers_total", budget) == 1
    assert registry.get_sample_value("enginehouse_budget_refusals_total", budget) == 2
    assert registry.get_sample_value("enginehouse_budget_demand_news_total", budget) == 3


def test_tunnel_series_from_a_real_bastion(sshd: Any) -> None:
    spec = DatabaseSpec(
        id=303,
        uri=PG_HOST_URI,
        ssh_tunnel={
            "server_address": "127.0.0.1",
            "server_port": sshd.port,
            "username": "ehtunnel",
            "password": "tunnel-pass-0123",
            "host_key": sshd.host_key_line,
        },
    )
    with EngineManager(cleanup_interval=60) as manager, manager.connect(spec) as connection:
        assert connection.execute(sqlalchemy.text("select 1")).scalar_one() == 1
        registry = registry_for(manager, pool_events=False)
        bastion = {"bastion": f"ehtunnel@127.0.0.1:{sshd.port}"}
        assert registry.get_sample_value("enginehouse_tunnel_up", bastion) == 1
        assert registry.get_sample_value("enginehouse_tunnel_forwards", bastion) == 1
        assert registry.get_sample_value("enginehouse_tunnel_active_channels", bastion) == 1
        assert registry.get_sample_value("enginehouse_tunnel_connects_total", bastion) == 1
