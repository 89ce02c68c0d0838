"""A real Celery prefork worker (concurrency 2) on the real Redis broker, using ``engines``.

The worker's main process opens a pooled PostgreSQL connection before it
forks; each child must then get its own, working connections (distinct
backend pids, none of them the parent's), with the fork hook having run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

pytestmark = pytest.mark.services("postgres", "redis")

BROKER = "redis://127.0.0.1:6379/5"
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DEADLINE = 90.0


@pytest.fixture(scope="module")
def worker() -> Iterator[tuple[Any, str, subprocess.Popen[bytes]]]:
    queue = f"enginehouse-test-{uuid.uuid4().hex[:12]}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
        "ENGINEHOUSE_TEST_CELERY_BROKER": BROKER,
        "ENGINEHOUSE_TEST_CELERY_QUEUE": queue,
    }
    saved = {name: os.environ.get(name) for name in env if name.startswith("ENGINEHOUSE_TEST_")}
    os.environ.update(  # read when celery_tasks is imported
        ENGINEHOUSE_TEST_CELERY_QUEUE=queue, ENGINEHOUSE_TEST_CELERY_BROKER=BROKER
    )
    sys.modules.pop("celery_tasks", None)
    import celery_tasks

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_tasks",
            "worker",
            "--pool=prefork",
            "--concurrency=2",
            "-Q",
            queue,
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-n",
            f"{queue}@%h",
        ],
        cwd=TESTS,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, so cleanup reaches the children
    )
    try:
        ready = celery_tasks.ping.apply_async(queue=queue)
        assert ready.get(timeout=DEADLINE) == "pong"
        yield celery_tasks, queue, process
    finally:
        _stop(process)
        redis.Redis.from_url(BROKER).delete(f"{queue}:parent")
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Warm shutdown (SIGTERM); the whole group is killed only if it does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    if process.stderr is not None:
        process.stderr.close()


def test_prefork_children_get_their_own_working_connections(
    worker: tuple[Any, str, subprocess.Popen[bytes]],
) -> None:
    tasks, queue, process = worker
    recorded = redis.Redis.from_url(BROKER, decode_responses=True).get(f"{queue}:parent")
    assert isinstance(recorded, str)
    parent_pid, parent_backend = (int(part) for part in recorded.split(":"))
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + DEADLINE
    # Batches of overlapping tasks, until both children have answered.
    while len({r["pid"] for r in results}) < 2:
        assert time.monotonic() < deadline, f"only saw children { ({r['pid'] for r in results}) }"
        batch = [tasks.backend.apply_async(args=(0.3,), queue=queue) for _ in range(6)]
        results += [result.get(timeout=DEADLINE) for result in batch]

    children = {r["pid"] for r in results}
    assert parent_pid not in children and process.pid == parent_pid
    by_child: dict[int, set[int]] = {}
    for r in results:
        by_child.setdefault(r["pid"], set()).add(r["backend_pid"])
        assert r["reset_pid"] == r["pid"]  # worker_process_init hook ran in this child
        assert r["generation"] >= 1  # the child noticed its fork
        assert r["actors_alive"]
        assert r["engines"] == 1
    backends = list(by_child.values())
    assert backends[0].isdisjoint(backends[1])  # no connection shared between children
    assert all(parent_backend not in b for b in backends)  # nor with the parent


def test_a_broken_task_input_does_not_poison_the_child(
    worker: tuple[Any, str, subprocess.Popen[bytes]],
) -> None:
    tasks, queue, _ = worker
    bad = tasks.backend.apply_async(args=("not-a-number",), queue=queue)
    with pytest.raises(Exception) as caught:
        bad.get(timeout=DEADLINE)
    assert "pg_sleep" in str(caught.value) or "invalid input" in str(caught.value)
    after = tasks.backend.apply_async(queue=queue).get(timeout=DEADLINE)
    assert after["backend_pid"] > 0 and after["actors_alive"]
