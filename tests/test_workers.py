"""gunicorn's hooks in a real forked child: post_fork rebuilds at once, worker_exit shuts down."""

from __future__ import annotations

import json
import os
import select
import time

import pytest
from conftest import PG_URI
from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.integrations.workers import after_fork, last_reset, post_fork, worker_exit

pytestmark = pytest.mark.services("postgres")

PG = PG_URI
SPEC = DatabaseSpec(id=701, uri=PG, extra={"engine_params": {"pool_size": 1}})
DEADLINE = 60.0


def _child(manager: EngineManager, write_end: int) -> None:
    report: dict[str, object] = {}
    try:
        post_fork(None, None)
        report["reset_pid"] = last_reset.pid
        report["rebuilt"] = last_reset.managers
        with manager.connect(SPEC) as connection:
            report["backend"] = connection.execute(text("select pg_backend_pid()")).scalar_one()
        report["alive"] = all(actor.alive for actor in manager.stats().actors)
        worker_exit(None, None)
        report["closed"] = manager.closed
        report["pid"] = os.getpid()
    except BaseException as exc:  # report, never raise into pytest's copy of the process
        report["error"] = f"{type(exc).__name__}: {exc}"
    os.write(write_end, json.dumps(report).encode())
    os._exit(0)


def _read(read_end: int) -> dict[str, object]:
    chunks = []
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        ready, _, _ = select.select([read_end], [], [], 1.0)
        if ready:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    report: dict[str, object] = json.loads(b"".join(chunks) or b"{}")
    return report


def test_post_fork_and_worker_exit_in_a_forked_child() -> None:
    with EngineManager(cleanup_interval=60) as manager:
        with manager.connect(SPEC) as connection:  # the parent's pool holds a connection
            parent_backend = connection.execute(text("select pg_backend_pid()")).scalar_one()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _child(manager, write_end)
        os.close(write_end)
        try:
            report = _read(read_end)
        finally:
            os.close(read_end)
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert "error" not in report, report["error"]
        assert report["pid"] == pid == report["reset_pid"]
        assert isinstance(report["rebuilt"], int) and report["rebuilt"] >= 1
        assert report["backend"] != parent_backend
        assert report["alive"] is True
        assert report["closed"] is True
        # the parent's manager and pool were not touched by the child
        assert not manager.closed
        with manager.connect(SPEC) as connection:
            assert (
                connection.execute(text("select pg_backend_pid()")).scalar_one() == parent_backend
            )


def test_after_fork_without_a_fork_is_harmless() -> None:
    with EngineManager(cleanup_interval=60) as manager:
        assert after_fork(manager) == 1
        assert last_reset.pid == os.getpid()
        assert manager.stats().engine_count == 0
    assert after_fork(manager) == 0  # a closed manager is skipped
