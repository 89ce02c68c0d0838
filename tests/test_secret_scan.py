"""The secret-scan plugin itself: it fails a session that logs a secret, without printing it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from secret_scan import SECRETS, assert_no_secret, exception_text, register_secret

from enginehouse import DatabaseSpec
from enginehouse.errors import InvalidSpecError

pytestmark = pytest.mark.services("postgres")

PLANTED = "planted-s3cr3t-value"


def _run_session(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["secret_scan"]\n')
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(body))
    tests_dir = str(Path(__file__).parent)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env={"PYTHONPATH": tests_dir, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_logged_secret_fails_the_session_without_showing_it(tmp_path: Path) -> None:
    result = _run_session(
        tmp_path,
        f"""
        import logging
        from secret_scan import register_secret

        def test_leaks():
            register_secret({PLANTED!r})
            logging.getLogger("enginehouse.leaky").debug("connecting with %s", {PLANTED!r})
        """,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "SECRET SCAN FAILED" in output
    assert "enginehouse.leaky" in output
    assert "test_inner.py::test_leaks" in output
    assert PLANTED not in output


def test_a_non_propagating_logger_is_scanned_too(tmp_path: Path) -> None:
    result = _run_session(
        tmp_path,
        f"""
        import logging
        from secret_scan import register_secret

        register_secret({PLANTED!r})
        isolated = logging.getLogger("thirdparty.isolated")
        isolated.propagate = False

        def test_leaks():
            isolated.warning("token=%s", {PLANTED!r})
        """,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "thirdparty.isolated" in output
    assert PLANTED not in output


def test_a_clean_session_passes(tmp_path: Path) -> None:
    result = _run_session(
        tmp_path,
        """
        import logging

        def test_clean():
            logging.getLogger("enginehouse.tidy").info("connecting as %s", "postgres")
        """,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "no leak" in output


def test_assert_no_secret_catches_a_chained_exception() -> None:
    register_secret(PLANTED)
    try:
        try:
            raise RuntimeError(f"inner {PLANTED}")
        except RuntimeError as inner:
            raise ValueError("outer, clean") from inner
    except ValueError as exc:
        with pytest.raises(AssertionError) as caught:
            assert_no_secret(exc, what="error")
        assert PLANTED in exception_text(exc)
    assert PLANTED not in str(caught.value)


def test_bad_spec_errors_never_echo_the_password() -> None:
    """Bad-input cases: each error is built while a real secret is in the input."""
    password = "s3cr3t-pw"
    assert password in SECRETS
    bad_inputs: list[dict[str, Any]] = [
        {"id": 1, "uri": f"nosuch://u:{password}@h/db"},
        {"id": 1, "uri": f"postgresql://u:{password}@h/db", "password": password},
        {"id": 1, "uri": f"postgresql://u:{password}@h/db", "extra": "{not json"},
        {"id": 1, "uri": f"postgresql://u:{password}@h/db", "bogus": password},
        {"id": [password], "uri": "postgresql://u@h/db"},
        {"id": 1, "uri": "postgresql://u@h/db", "password": [password]},
        {
            "id": 1,
            "uri": "postgresql://u@h/db",
            "ssh_tunnel": {
                "server_address": "b",
                "username": "u",
                "private_key_password": password,
            },
        },
    ]
    for data in bad_inputs:
        with pytest.raises(InvalidSpecError) as caught:
            DatabaseSpec(**data)
        assert_no_secret(caught.value, what=f"error for {sorted(data)}")
    spec = DatabaseSpec(id=1, uri=f"postgresql://u:{password}@h/db")
    assert_no_secret(repr(spec), what="repr")
    assert_no_secret(spec.uri, what="uri")
