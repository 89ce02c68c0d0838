"""A real gunicorn (2 sync workers, --preload) with the post_fork hook and the Flask extension."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.services("postgres")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DEADLINE = 90.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def _wait_until_serving(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        assert process.poll() is None, "gunicorn exited during start-up"
        try:
            _get(url)
            return
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, "gunicorn did not serve in time"
            time.sleep(0.2)  # polling interval while the server starts, not a synchronisation


def test_workers_get_their_own_connections(tmp_path: Path) -> None:
    port = _free_port()
    state = tmp_path / "master.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
        "ENGINEHOUSE_TEST_GUNICORN_STATE": str(state),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(TESTS / "gunicorn_conf.py"),
            "-b",
            f"127.0.0.1:{port}",
            "gunicorn_app:app",
        ],
        cwd=TESTS,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/backend"
    try:
        _wait_until_serving(url, process)
        master = json.loads(state.read_text())
        answers: list[dict[str, Any]] = []
        deadline = time.monotonic() + DEADLINE
        with ThreadPoolExecutor(max_workers=4) as pool:
            # overlapping requests: a busy sync worker leaves the next one to the other
            while len({a["pid"] for a in answers}) < 2:
                assert time.monotonic() < deadline, f"one worker only: {answers}"
                answers += list(pool.map(_get, [url] * 4))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
    assert process.returncode == 0
    assert master["pid"] == process.pid
    by_worker: dict[int, set[int]] = {}
    for answer in answers:
        assert answer["reset_pid"] == answer["pid"]  # post_fork ran in this worker
        by_worker.setdefault(answer["pid"], set()).add(answer["backend"])
    assert process.pid not in by_worker
    first, second = by_worker.values()
    assert first.isdisjoint(second)
    assert master["backend"] not in first | second
