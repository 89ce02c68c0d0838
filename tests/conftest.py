"""Shared fixtures. Area-specific fixtures live in their own modules, listed in pytest_plugins."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pykka
import pytest

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.compat import postgres_uri

pytest_plugins: list[str] = [
    "service_rule", "secret_scan", "sshd_fixtures", "fleet_fixtures", "pgbouncer_fixtures",
    "redis_ha_fixtures",
]

# The one place tests name PostgreSQL: psycopg 3 on SQLAlchemy 2, psycopg2 on 1.4.
PG_URI = os.environ.get("ENGINEHOUSE_TEST_PG", postgres_uri("postgres@127.0.0.1:5432/test"))
MYSQL_URI = os.environ.get("ENGINEHOUSE_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")


@pytest.fixture
def pg_spec() -> DatabaseSpec:
    return DatabaseSpec(id=101, uri=PG_URI, extra={"engine_params": {"pool_size": 5}})


@pytest.fixture
def mysql_spec() -> DatabaseSpec:
    return DatabaseSpec(id=201, uri=MYSQL_URI)


@pytest.fixture
def manager() -> Iterator[EngineManager]:
    """A SINGLETON manager, shut down after the test."""
    # forbid_unsafe_uris=False: tests use SQLite files (the rule has its own tests).
    with EngineManager(
        mode="singleton", cleanup_interval=60, ask_timeout=10, forbid_unsafe_uris=False
    ) as m:
        yield m


@pytest.fixture
def new_manager() -> Iterator[EngineManager]:
    # forbid_unsafe_uris=False: tests use SQLite files (the rule has its own tests).
    with EngineManager(
        mode="new", cleanup_interval=60, ask_timeout=10, forbid_unsafe_uris=False
    ) as m:
        yield m


def our_threads() -> list[threading.Thread]:
    """Threads that belong to pykka actors or our timers."""
    return [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and ("Actor" in t.name or "Timer" in t.name
                                                  or "Janitor" in t.name or "Supervisor" in t.name
                                                  or "Registry" in t.name)
    ]


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, what: str = "") -> object:
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what or predicate}")
        time.sleep(0.02)


@pytest.fixture
def poll() -> Callable[..., object]:
    """``poll(predicate, timeout=20, what="...")``: wait for a condition with a deadline."""
    return wait_until


@pytest.fixture
def sqlite_files_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Core tests use SQLite files in tmp_path; lift the URI safety rule that refuses them."""
    monkeypatch.setenv("ENGINEHOUSE_FORBID_UNSAFE_URIS", "false")


class Recorder(pykka.ThreadingActor):
    """Stands in for a supervisor in actor-level tests: keeps every message told to it.

    Ask it ``"seen"`` for the list so far.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    def on_receive(self, message: Any) -> Any:
        if message == "seen":
            return list(self.seen)
        self.seen.append(message)
        return None


@pytest.fixture
def recorder() -> Iterator[pykka.ActorRef[Any]]:
    ref = Recorder.start()
    yield ref
    ref.stop()
