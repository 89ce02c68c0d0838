"""The pool-timing helper both telemetry sinks share, against real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import PG_URI
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from enginehouse.integrations.pool_timing import PoolSink, instrument

pytestmark = pytest.mark.services("postgres")


class Recording(PoolSink):
    """Overrides every step and records it (durations must be >= 0)."""

    def __init__(self) -> None:
        self.steps: list[str] = []

    def _note(self, step: str, seconds: float | None = 0.0) -> None:
        assert seconds is None or seconds >= 0
        self.steps.append(step)

    def waiting(self) -> None:
        self._note("waiting")

    def acquired(self, seconds: float) -> None:
        self._note("acquired", seconds)

    def timed_out(self) -> None:
        self._note("timed_out")

    def opened(self, seconds: float | None) -> None:
        self._note("opened" if seconds is not None else "opened-untimed", seconds)

    def checked_out(self) -> None:
        self._note("checked_out")

    def checked_in(self, seconds: float) -> None:
        self._note("checked_in", seconds)

    def invalidated(self) -> None:
        self._note("invalidated")

    def closed(self) -> None:
        self._note("closed")


class AcquireOnly(PoolSink):
    def __init__(self) -> None:
        self.waits: list[float] = []

    def acquired(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = create_engine(PG_URI, pool_size=1, max_overflow=0, pool_timeout=0.2)
    yield engine
    engine.dispose()


def test_every_step_of_a_checkout_reaches_the_sink(engine: Engine) -> None:
    sink = Recording()
    instrument(engine, sink)
    with engine.connect() as connection:
        assert connection.execute(text("select 1")).scalar() == 1
        connection.invalidate()
    engine.dispose()
    assert sink.steps[:4] == ["waiting", "opened", "checked_out", "acquired"]
    assert {"checked_in", "invalidated", "closed"} <= set(sink.steps[4:])


def test_a_checkout_past_pool_timeout_is_reported_as_one(engine: Engine) -> None:
    sink = Recording()
    instrument(engine, sink)
    with engine.connect(), pytest.raises(Exception, match="QueuePool limit"):
        engine.connect()
    assert sink.steps.count("timed_out") == 1
    assert sink.steps.count("acquired") == 2  # the timed-out wait is timed too


def test_steps_a_sink_leaves_alone_get_no_listener(engine: Engine) -> None:
    names = ("checkout", "checkin", "connect", "close", "invalidate", "soft_invalidate")
    before = {name: _listeners(engine, name) for name in names}
    had_events = engine._has_events  # True when another test left a listener on Engine itself
    sink = AcquireOnly()
    instrument(engine, sink)
    with engine.connect() as connection:
        connection.execute(text("select 1"))
    assert len(sink.waits) == 1
    assert {name: _listeners(engine, name) for name in names} == before
    assert engine._has_events is had_events  # the statement path gains no event dispatch


def _listeners(engine: Engine, name: str) -> int:
    return len(getattr(engine.pool.dispatch, name))
