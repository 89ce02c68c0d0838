"""Tests that need a service: skipped with the reason when it is down, failed under CI.

Mark a test (or a module, with ``pytestmark``) ``@pytest.mark.services("postgres", ...)``;
fixtures that start or install a service call :func:`service_unavailable` when they cannot.
``.ci/run`` sets ``ENGINEHOUSE_REQUIRE_SERVICES=1``: CI starts every service, so there a
missing one is a failure, not a skip.
"""

from __future__ import annotations

import functools
import os
import socket
from typing import NoReturn

import pytest

SERVICES = {"postgres": 5432, "mariadb": 3306, "redis": 6379}
"""The machine's shared services (127.0.0.1) and their ports; sshd and PgBouncer are per run."""

def service_unavailable(name: str, reason: str) -> NoReturn:
    """Skip the calling test because service ``name`` cannot be had (fail it under CI)."""
    message = f"service unavailable: {name}: {reason}"
    if os.environ.get("ENGINEHOUSE_REQUIRE_SERVICES") == "1":  # set by .ci/run
        pytest.fail(f"{message} (ENGINEHOUSE_REQUIRE_SERVICES=1: CI runs every service)")
    pytest.skip(message)


@functools.cache
def _service_down(name: str) -> str | None:
    """Why ``name`` does not answer on its port (None when it does); probed once per run."""
    try:
        with socket.create_connection(("127.0.0.1", SERVICES[name]), timeout=3):
            return None
    except OSError as exc:
        return f"nothing answers on 127.0.0.1:{SERVICES[name]} ({exc.strerror or exc})"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "services(*names): the test needs these running services (postgres, mariadb, redis); "
        "skipped with the reason when one is down, "
        "failed instead under ENGINEHOUSE_REQUIRE_SERVICES=1",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("services"):
        for name in marker.args:
            reason = _service_down(name)
            if reason is not None:
                service_unavailable(name, reason)
