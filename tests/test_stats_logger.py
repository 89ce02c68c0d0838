"""Pool telemetry into a StatsD-style logger (Superset's STATS_LOGGER), against real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import PG_URI
from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.errors import EngineManagerError
from enginehouse.integrations.stats_logger import feed_stats_logger, stop_feeding

pytestmark = pytest.mark.services("postgres")


class RecordingStatsLogger:
    """The interface of superset.stats_logger.BaseStatsLogger, recording each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def incr(self, key: str) -> None:
        self.calls.append(("incr", key))

    def decr(self, key: str) -> None:
        self.calls.append(("decr", key))

    def timing(self, key: str, value: float) -> None:
        assert value >= 0
        self.calls.append(("timing", key))

    def gauge(self, key: str, value: float) -> None:
        self.calls.append(("gauge", key))


class BrokenStatsLogger(RecordingStatsLogger):
    def timing(self, key: str, value: float) -> None:
        raise ConnectionError("statsd is down")


@pytest.fixture
def recorder() -> Iterator[RecordingStatsLogger]:
    logger = RecordingStatsLogger()
    feed = feed_stats_logger(logger)
    yield logger
    stop_feeding(feed)


def test_checkouts_connects_timeouts_and_invalidations_are_sent(
    recorder: RecordingStatsLogger,
) -> None:
    spec = DatabaseSpec(id=1701, uri=PG_URI, extra={"engine_params": {
        "pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2}})
    with EngineManager() as manager, manager.connect(spec) as connection:
        connection.execute(text("SELECT 1"))
        with pytest.raises(EngineManagerError), manager.connect(spec):
            pass  # the only connection is out: this one times out
        connection.invalidate()
    calls = set(recorder.calls)
    for expected in (("timing", "enginehouse.pool.1701.acquire"),
                     ("timing", "enginehouse.pool.1701.creation"),
                     ("timing", "enginehouse.pool.1701.usage"),
                     ("incr", "enginehouse.pool.1701.active"),
                     ("decr", "enginehouse.pool.1701.active"),
                     ("incr", "enginehouse.pool.1701.timeout"),
                     ("incr", "enginehouse.pool.1701.invalidated")):
        assert expected in calls, expected
    assert all("postgres" not in key and "127.0.0.1" not in key for _kind, key in calls)


def test_a_failing_stats_logger_never_fails_a_query(caplog: pytest.LogCaptureFixture) -> None:
    feed = feed_stats_logger(BrokenStatsLogger())
    try:
        spec = DatabaseSpec(id=1702, uri=PG_URI)
        with EngineManager() as manager:
            for _ in range(3):
                with manager.connect(spec) as connection:
                    assert connection.execute(text("SELECT 7")).scalar() == 7
        warnings = [r for r in caplog.records if r.name == "enginehouse.stats_logger"]
        assert len(warnings) == 1 and "ConnectionError" in warnings[0].getMessage()
    finally:
        stop_feeding(feed)
