"""After os.fork() the child gets a fresh actor system and fresh pools, not the parent's sockets."""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import PG_URI
from sqlalchemy import text
from sqlalchemy.engine import Engine

from enginehouse import DatabaseSpec, EngineManager, engines

pytestmark = pytest.mark.services("postgres")

CHILD_DEADLINE = 60.0


def backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("select pg_backend_pid()")).scalar_one())


def in_child(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Fork; run ``work`` in the child, which reports JSON and leaves by ``os._exit``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 1
        try:
            os.close(read_end)
            result = work()
            os.write(write_end, json.dumps(result).encode())
            status = 0
        except BaseException:
            os.write(write_end, json.dumps({"error": traceback.format_exc()}).encode())
        finally:
            os._exit(status)
    os.close(write_end)
    deadline = time.monotonic() + CHILD_DEADLINE
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child did not finish within {CHILD_DEADLINE:g}s")
        time.sleep(0.02)
    with os.fdopen(read_end, "rb") as pipe:
        report: dict[str, Any] = json.loads(pipe.read() or b"{}")
    assert os.waitstatus_to_exitcode(status) == 0, report.get("error", report)
    return report


@pytest.fixture
def db() -> DatabaseSpec:
    return DatabaseSpec(id="fork", uri=PG_URI, extra={"engine_params": {"pool_size": 2}})


def test_child_gets_fresh_pool_and_parent_connection_survives(
    manager: EngineManager, db: DatabaseSpec
) -> None:
    engine = manager.get(db)
    parent_pid = backend_pid(engine)  # now pooled, checked in
    parent_refs = manager._system  # private: tests may look

    def child() -> dict[str, Any]:
        fresh = manager.get(db)
        child_pid = backend_pid(fresh)
        inherited_pid = backend_pid(engine)  # the parent's engine object, re-pooled
        stats = manager.stats()
        system_changed = manager._system is not parent_refs
        manager.shutdown()
        return {
            "child_pid": child_pid,
            "inherited_pid": inherited_pid,
            "same_object": fresh is engine,
            "created": stats.created,
            "system_changed": system_changed,
        }

    report = in_child(child)
    assert report["child_pid"] != parent_pid
    assert report["inherited_pid"] != parent_pid
    assert report["same_object"] is False
    assert report["created"] == 1  # the child's own registry built its own engine
    assert report["system_changed"] is True
    # The parent's pooled connection was neither closed nor shared by the child.
    assert backend_pid(engine) == parent_pid
    assert manager.get(db) is engine
    assert manager.stats().created == 1


def test_new_mode_in_a_child(new_manager: EngineManager, db: DatabaseSpec) -> None:
    parent_pid = backend_pid(new_manager.get(db))

    def child() -> dict[str, Any]:
        with new_manager.connect(db) as conn:
            return {"pid": conn.execute(text("select pg_backend_pid()")).scalar_one()}

    assert in_child(child)["pid"] != parent_pid


@pytest.fixture
def default_engines() -> Iterator[None]:
    engines.shutdown()
    saved = engines._settings
    yield
    engines.shutdown()
    engines._settings = saved


@pytest.mark.usefixtures("default_engines")
def test_default_engines_in_a_child(db: DatabaseSpec) -> None:
    engines.configure(mode="singleton", cleanup_interval=60)
    parent_pid = backend_pid(engines.get(db))
    parent_manager = engines.manager()

    def child() -> dict[str, Any]:
        pid = backend_pid(engines.get(db))
        return {"pid": pid, "created": engines.stats().created}

    report = in_child(child)
    assert report["pid"] != parent_pid
    assert report["created"] == 1
    assert engines.manager() is parent_manager
    assert backend_pid(engines.get(db)) == parent_pid


def test_grandchild(manager: EngineManager, db: DatabaseSpec) -> None:
    parent_pid = backend_pid(manager.get(db))

    def child() -> dict[str, Any]:
        child_pid = backend_pid(manager.get(db))
        grandchild = in_child(lambda: {"pid": backend_pid(manager.get(db))})
        return {"child": child_pid, "grandchild": grandchild["pid"]}

    report = in_child(child)
    assert len({parent_pid, report["child"], report["grandchild"]}) == 3
