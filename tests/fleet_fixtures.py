"""Fixtures for the fleet tests: Redis key prefixes, a private Redis, a pg_stat_activity sampler.

The shared Redis at 127.0.0.1:6379 is never stopped: outage tests start a
private ``redis-server`` on a free port (no persistence) and stop/restart it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import PG_URI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for benchmarks/, whatever directory pytest runs from
from benchmarks.common import ConnectionSampler  # noqa: E402

SHARED_REDIS = os.environ.get("ENGINEHOUSE_TEST_REDIS", "redis://127.0.0.1:6379/0")
PG_DSN = os.environ.get("ENGINEHOUSE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
WORKER = ROOT / "tests" / "fleet_worker.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def fleet_prefix() -> Iterator[str]:
    """A Redis key prefix of this test only; its keys are deleted afterwards."""
    prefix = unique("eh-test")
    yield prefix
    client = redis.Redis.from_url(SHARED_REDIS)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


def leases_by_process(url: str, prefix: str, budget: str) -> dict[str, int]:
    """Permits each registered process holds in Redis for ``budget`` (dead ones until reaped)."""
    client = redis.Redis.from_url(url, decode_responses=True)
    tag = f"{prefix}:{{{budget}}}"
    try:
        processes = [str(p) for p in client.zrange(f"{tag}:procs", 0, -1)]
        counts = {p: int(client.llen(f"{tag}:taken:{p}")) for p in processes}
        return {p: n for p, n in counts.items() if n}
    finally:
        client.close()


def lease_count(url: str, prefix: str, budget: str) -> int:
    """Permits held in Redis for ``budget`` by registered processes."""
    return sum(leases_by_process(url, prefix, budget).values())


class PrivateRedis:
    """A redis-server of our own on a free port, stoppable and restartable (same port)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (the project's services need it)")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--enable-debug-command", "local"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not self.answers():
            if time.monotonic() > deadline:
                pytest.fail(f"private redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None

    def answers(self) -> bool:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


class PgSampler(ConnectionSampler):
    """Counts ``application_name``'s server connections in pg_stat_activity, in a thread."""

    def __init__(self, application_name: str) -> None:
        super().__init__(application_name, PG_DSN, every=0.002)


def budget_of(manager: Any, database: Any) -> Any:
    """``manager.stats()``'s BudgetStats of ``database`` (it must exist already)."""
    return next(b for b in manager.stats().budgets if b.key == f"db:{database.id}")


def waiting_in(manager: Any, database: Any) -> int:
    """Callers of ``manager`` waiting for a permit of ``database`` (0 before its engine exists)."""
    key = f"db:{database.id}"
    return next((b.waiting for b in manager.stats().budgets if b.key == key), 0)


def pg_spec_dict(
    database_id: int | str, application_name: str, cap: int, **engine_params: Any
) -> dict[str, Any]:
    """A DatabaseSpec as keywords (JSON-able, for worker processes)."""
    params = {"connect_args": {"application_name": application_name}, **engine_params}
    return {
        "id": database_id,
        "uri": PG_URI,
        "extra": {"max_connections": cap, "engine_params": params},
    }


def start_worker(config: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def worker_result(process: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"worker failed ({process.returncode}): {err[-2000:]}"
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"worker printed no result: {out[-500:]} {err[-2000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result
