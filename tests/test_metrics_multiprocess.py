"""Metrics across worker processes (prometheus_client multiprocess mode), real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import PG_URI
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from enginehouse import EngineManager
from enginehouse.integrations.metrics import mark_process_dead, registry_for

pytestmark = pytest.mark.services("postgres")

DATABASE = "1601"

WORKER = f"""
import sys
from sqlalchemy import text
from enginehouse import DatabaseSpec, EngineManager
from enginehouse.integrations.metrics import enable_pool_events

enable_pool_events()
spec = DatabaseSpec(id={DATABASE}, uri={PG_URI!r},
                    extra={{"engine_params": {{"pool_size": 2, "max_overflow": 1}}}})
with EngineManager() as manager:
    with manager.connect(spec) as connection:
        connection.execute(text("SELECT 1"))
        print("held", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    sys.stdin.readline()
"""


class Worker:
    """A separate Python process holding one checked-out connection until told."""

    def __init__(self, directory: Path) -> None:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )

    def expect(self, line: str) -> None:
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == line

    def step(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()


@pytest.fixture
def shared_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    yield tmp_path


def _scrape(manager: EngineManager) -> Callable[[str], float | None]:
    page = generate_latest(registry_for(manager)).decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.labels.get("database") == DATABASE:
                values[sample.name] = sample.value
    return values.get


def test_pool_metrics_add_up_across_processes(shared_dir: Path) -> None:
    workers = [Worker(shared_dir), Worker(shared_dir)]
    try:
        for worker in workers:
            worker.expect("held")
        with EngineManager() as scraper:
            value = _scrape(scraper)
            assert value("enginehouse_pool_active_connections") == 2
            assert value("enginehouse_pool_open_connections") == 2
            assert value("enginehouse_pool_connections_opened_total") == 2
            assert value("enginehouse_pool_max_connections") == 2 * (2 + 1)
            assert value("enginehouse_pool_wait_seconds_count") == 2
            assert value("enginehouse_pool_connection_creation_seconds_count") == 2
            for worker in workers:
                worker.step()
                worker.expect("released")
            value = _scrape(scraper)
            assert value("enginehouse_pool_active_connections") == 0
            assert value("enginehouse_pool_usage_seconds_count") == 2
            for worker in workers:
                worker.step()
                assert worker.process.wait(60) == 0
                mark_process_dead(worker.process.pid)  # what the child_exit hook does
            value = _scrape(scraper)
            assert value("enginehouse_pool_open_connections") in (None, 0)  # live gauges gone
            assert value("enginehouse_pool_connections_opened_total") == 2  # counters stay
            assert "enginehouse_pool_size" not in generate_latest(registry_for(scraper)).decode()
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait(30)


def test_a_dropped_database_leaves_no_series(poll: Callable[..., object]) -> None:
    import gc

    from sqlalchemy import text

    from enginehouse import DatabaseSpec

    spec = DatabaseSpec(id=1602, uri=PG_URI)
    with EngineManager() as manager:
        registry = registry_for(manager)
        with manager.connect(spec) as connection:
            connection.execute(text("SELECT 1"))
        del connection  # it refers to its engine
        assert 'database="1602"' in generate_latest(registry).decode()
        manager.dispose(1602)

        def series_gone() -> bool:
            gc.collect()  # the engine may sit in a reference cycle until the collector runs
            return 'database="1602"' not in generate_latest(registry).decode()

        poll(series_gone, what="the dropped database's series to go")
