"""The services rule: a missing service skips with its reason; under CI it fails instead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

PROBE = '''
import pytest

pytestmark = pytest.mark.services("postgres")

def test_needs_postgres():
    assert True
'''


def _run(tmp_path: Path, require: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {**os.environ, "ENGINEHOUSE_REQUIRE_SERVICES": require}
    # A conftest that points the rule at a port where nothing listens.
    (tmp_path / "conftest.py").write_text(
        "import service_rule\n"
        "service_rule.SERVICES['postgres'] = 9\n"  # the discard port: nothing answers there
    )
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         "-p", "service_rule",
         str(tmp_path / "test_probe.py"), "--rootdir", str(tmp_path), "-c", os.devnull],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


def test_a_missing_service_skips_with_its_reason(tmp_path: Path) -> None:
    result = _run(tmp_path, "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "service unavailable: postgres: nothing answers on 127.0.0.1:9" in result.stdout


def test_ci_turns_the_skip_into_a_failure(tmp_path: Path) -> None:
    result = _run(tmp_path, "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout  # failed in setup: red, as a failure
    assert "ENGINEHOUSE_REQUIRE_SERVICES=1" in result.stdout


@pytest.mark.services("postgres")
def test_a_running_service_lets_the_test_run() -> None:
    from service_rule import _service_down

    assert _service_down("postgres") is None
