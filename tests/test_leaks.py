"""Leak detection (issue 15): a connection held past leak_detection_threshold is reported once."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import pytest
from conftest import PG_URI
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.errors import ConfigurationError
from enginehouse.integrations.metrics import ManagerCollector

pytestmark = pytest.mark.services("postgres")

SECRET = "leak-Secr3t-pw"  # trust auth ignores it; it must never reach a log line


@pytest.fixture
def spec() -> DatabaseSpec:
    uri = PG_URI.replace("postgres@", f"postgres:{SECRET}@", 1)
    return DatabaseSpec(id=1501, uri=uri, extra={"engine_params": {"pool_size": 2}})


@pytest.fixture
def manager() -> Iterator[EngineManager]:
    with EngineManager(leak_detection_threshold=0.2, ask_timeout=10) as m:
        yield m


def _leak_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "enginehouse.leaks" and r.levelno == logging.WARNING]


def hold_a_connection_in_a_helper(manager: EngineManager, spec: DatabaseSpec,
                                  release: threading.Event, held: threading.Event) -> None:
    with manager.connect(spec, source="SQL_LAB") as connection:
        connection.execute(text("SELECT 1"))
        held.set()
        release.wait(60)


def test_a_long_checkout_is_reported_once_with_its_stack(
    manager: EngineManager, spec: DatabaseSpec, caplog: pytest.LogCaptureFixture,
    poll: Callable[..., object],
) -> None:
    caplog.set_level(logging.WARNING, logger="enginehouse.leaks")
    release, held = threading.Event(), threading.Event()
    holder = threading.Thread(
        target=hold_a_connection_in_a_helper, args=(manager, spec, release, held),
        name="leaky-worker",
    )
    holder.start()
    try:
        assert held.wait(30)
        poll(lambda: _leak_warnings(caplog), what="a leak warning")
        # Many Janitor rounds later (interval = threshold / 2), still one warning.
        poll(lambda: any(h.age > 1.5 for h in manager.stats().long_holders), what="an old holder")
        (warning,) = _leak_warnings(caplog)
        message = warning.getMessage()
        assert "database 1501" in message and "source SQL_LAB" in message
        assert "thread leaky-worker" in message
        assert "hold_a_connection_in_a_helper" in message and "test_leaks.py" in message
        assert SECRET not in message
        stats = manager.stats()
        assert stats.leaks == {"1501": 1}
        (long_holder,) = stats.long_holders
        assert (long_holder.database_id, long_holder.source, long_holder.thread) == (
            1501, "SQL_LAB", "leaky-worker")
        scrape = generate_latest(_registry(manager)).decode()
        assert 'enginehouse_connection_leaks_total{database="1501"} 1.0' in scrape
        assert 'enginehouse_connection_long_holders{database="1501"} 1.0' in scrape
    finally:
        release.set()
        holder.join(30)
    poll(lambda: manager.stats().long_holders == [], what="the holder gone after check-in")
    assert manager.stats().leaks == {"1501": 1}  # a counter: it stays


def test_short_checkouts_are_not_reported(
    manager: EngineManager, spec: DatabaseSpec, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="enginehouse.leaks")
    for _ in range(20):
        with manager.connect(spec) as connection:
            connection.execute(text("SELECT 1"))
    manager_leaks = manager._leaks
    assert manager_leaks is not None
    assert manager_leaks.scan() == 0
    assert _leak_warnings(caplog) == [] and manager.stats().long_holders == []


def test_off_by_default(spec: DatabaseSpec) -> None:
    with EngineManager() as plain:
        with plain.connect(spec) as connection:
            connection.execute(text("SELECT 1"))
            stats = plain.stats()
        assert plain._leaks is None
        assert stats.leaks == {} and stats.long_holders == []


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "soon"])
def test_the_threshold_is_validated(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="leak_detection_threshold"):
        EngineManager(leak_detection_threshold=bad)


def _registry(manager: EngineManager) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ManagerCollector(manager))
    return registry
