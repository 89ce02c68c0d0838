"""``python -m enginehouse``: help everywhere, check against real PostgreSQL, stats, bench."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PG_URI
from prometheus_client import CollectorRegistry, start_http_server
from secret_scan import assert_no_secret, register_secret

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.cli.main import main
from enginehouse.integrations.metrics import disable_pool_events, start_metrics_server

pytestmark = pytest.mark.services("postgres", "mariadb")

ROOT = Path(__file__).resolve().parent.parent
PG = PG_URI
PASSWORD = "s3cr3t-pw"  # the server trusts loopback, so any password works; none may be printed
register_secret(PASSWORD)


@pytest.fixture(autouse=True)
def _pool_events_off_afterwards() -> Iterator[None]:
    """Metrics enable process-wide checkout timers: switch them off for the next tests."""
    yield
    disable_pool_events()


def with_password(uri: str) -> str:
    return uri.replace("://postgres@", f"://postgres:{PASSWORD}@", 1)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "enginehouse", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_no_secret(result.stdout, what="stdout")
    assert_no_secret(result.stderr, what="stderr")
    return result


def call(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """The same command in this process (cheaper than a subprocess for the many bad inputs)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    assert_no_secret(out, what="stdout")
    assert_no_secret(err, what="stderr")
    return subprocess.CompletedProcess(list(args), code, out, err)


def write_spec(tmp_path: Path, data: Any, name: str = "spec.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("command", [[], ["check"], ["demo"]])
def test_help_everywhere(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: enginehouse" in result.stdout


@pytest.mark.parametrize("command", [["stats"], ["bench"]])
def test_help_in_process(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert f"usage: enginehouse {command[0]}" in capsys.readouterr().out


def test_no_command_is_bad_input() -> None:
    result = run()
    assert result.returncode == 2
    assert "usage: enginehouse" in result.stderr


def test_unknown_option_is_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["check", str(tmp_path / "x.json"), "--timeout", "-1"])
    assert exited.value.code == 2
    assert "must be > 0" in capsys.readouterr().err


def test_check_good_spec(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, {"id": 7, "uri": with_password(PG)})
    result = run("check", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for step in ("read", "spec", "driver", "engine", "connect", "query"):
        assert any(line.split()[:2] == [step, "ok"] for line in lines), result.stdout
    assert any(line.split()[:2] == ["tunnel", "skipped"] for line in lines)
    assert "SELECT 1 -> 1" in result.stdout
    assert "OK: database 7" in result.stdout


def test_check_json_report(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    spec = write_spec(tmp_path, {"id": "warehouse", "uri": with_password(PG)})
    result = call(capsys, "check", str(spec), "--json", "--query", "select current_database()")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["database_id"] == "warehouse"
    steps = {step["name"]: step for step in report["steps"]}
    assert steps["query"]["detail"].endswith("-> test")
    assert all(steps[name]["seconds"] >= 0 for name in ("spec", "driver", "connect", "query"))


@pytest.mark.parametrize(
    ("data", "code", "step", "expected"),
    [
        ("{not json", 2, "read", "not valid JSON"),
        ("[1, 2]", 2, "read", "must hold a JSON object"),
        ({"uri": with_password(PG)}, 2, "spec", "id"),
        (
            {"id": 1, "uri": with_password(PG), "extra": {"engine_params": {"pool_size": -1}}},
            2,
            "spec",
            "extra.engine_params.pool_size",
        ),
        ({"id": 1, "uri": with_password(PG), "password": PASSWORD}, 2, "spec", "password"),
        ({"id": 1, "uri": f"nosuchdialect://u:{PASSWORD}@h/db"}, 3, "spec", "nosuchdialect"),
        ({"id": 1, "uri": f"mssql+pymssql://sa:{PASSWORD}@127.0.0.1/db"}, 3, "driver", "pymssql"),
        (
            {"id": 1, "uri": with_password(PG), "extra": {"engine_params": {"bogus_arg": 1}}},
            7,
            "engine",
            "bogus_arg",
        ),
    ],
    ids=[
        "json",
        "not-object",
        "no-id",
        "pool-size",
        "two-passwords",
        "dialect",
        "driver",
        "engine-arg",
    ],
)
def test_check_bad_specs(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    data: Any,
    code: int,
    step: str,
    expected: str,
) -> None:
    if step == "driver":
        assert importlib.util.find_spec("pymssql") is None, "precondition: pymssql not installed"
    result = call(capsys, "check", str(write_spec(tmp_path, data)))
    assert result.returncode == code, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if " failed " in line]
    assert failed and failed[0].split()[0] == step, result.stdout
    assert expected in failed[0]
    assert f"exit {code}" in result.stderr


def test_check_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    result = call(capsys, "check", str(tmp_path / "absent.json"))
    assert result.returncode == 2
    assert "no such file" in result.stderr


def test_check_unreachable_server(tmp_path: Path) -> None:
    uri = with_password(PG).replace(":5432/", f":{free_port()}/")
    result = run("check", str(write_spec(tmp_path, {"id": 1, "uri": uri})), "--timeout", "5")
    assert result.returncode == 5, result.stdout + result.stderr
    assert "check failed (connect, exit 5)" in result.stderr


def test_check_unknown_role(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    uri = with_password(PG).replace("://postgres:", "://no_such_role_eh:")
    result = call(capsys, "check", str(write_spec(tmp_path, {"id": 1, "uri": uri})))
    assert result.returncode == 5
    assert "no_such_role_eh" in result.stderr


def test_check_failing_query(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    spec = write_spec(tmp_path, {"id": 1, "uri": with_password(PG)})
    result = call(capsys, "check", str(spec), "--query", "select * from no_such_table_eh")
    assert result.returncode == 6
    assert "no_such_table_eh" in result.stderr


@pytest.fixture
def metrics_url() -> Iterator[str]:
    with EngineManager(cleanup_interval=60) as manager:
        spec = DatabaseSpec(id=77, uri=with_password(PG), extra={"engine_params": {"pool_size": 2}})
        with manager.connect(spec):
            pass
        server = start_metrics_server(manager, port=0)
        try:
            yield f"http://127.0.0.1:{server.port}"
        finally:
            server.stop()


def test_stats_summary(metrics_url: str) -> None:
    result = run("stats", metrics_url)
    assert result.returncode == 0, result.stderr
    assert f"enginehouse at {metrics_url}/metrics: up" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines()]
    pool_row = next(row for row in rows if row and row[0] == "77")
    assert pool_row[1:4] == ["1", "2", "0"]  # engines, size, in use
    assert any("registry up" in line for line in result.stdout.splitlines())


def test_stats_json(capsys: pytest.CaptureFixture[str], metrics_url: str) -> None:
    result = call(capsys, "stats", metrics_url + "/metrics", "--json")
    assert result.returncode == 0, result.stderr
    samples = json.loads(result.stdout)
    engines = [s for s in samples if s["name"] == "enginehouse_engines"]
    assert engines == [{"name": "enginehouse_engines", "labels": {"database": "77"}, "value": 1.0}]


def test_stats_bad_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    assert call(capsys, "stats", "ftp://example.org/metrics").returncode == 2
    unreachable = call(capsys, "stats", f"http://127.0.0.1:{free_port()}", "--timeout", "5")
    assert unreachable.returncode == 5
    assert "cannot fetch" in unreachable.stderr
    server, thread = start_http_server(0, addr="127.0.0.1", registry=CollectorRegistry())
    try:
        foreign = call(capsys, "stats", f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert foreign.returncode == 6
    assert "no enginehouse_* metrics" in foreign.stderr


def test_bench_list_and_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    listed = call(capsys, "bench", "--list")
    assert listed.returncode == 0
    assert "bench_core" in listed.stdout.split()
    unknown = call(capsys, "bench", "bench_nothing")
    assert unknown.returncode == 2
    assert "unknown benchmark" in unknown.stderr


def tunnel_spec(port: int, password: str = "tunnel-pass-0123", **extra: Any) -> dict[str, Any]:
    return {
        "id": 8,
        "uri": with_password(PG),
        "ssh_tunnel": {
            "server_address": "127.0.0.1",
            "server_port": port,
            "username": "ehtunnel",
            "password": password,
            **extra,
        },
    }


def test_check_through_an_ssh_tunnel(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, sshd: Any
) -> None:
    spec = write_spec(tmp_path, tunnel_spec(sshd.port, host_key=sshd.host_key_line))
    result = call(capsys, "check", str(spec), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = {step["name"]: step for step in json.loads(result.stdout)["steps"]}
    assert steps["tunnel"]["status"] == "ok"
    assert f"via ehtunnel@127.0.0.1:{sshd.port}" in steps["tunnel"]["detail"]
    assert steps["query"]["status"] == "ok"


@pytest.mark.parametrize("case", ["refused", "wrong-password"])
def test_check_tunnel_failures(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, sshd: Any, case: str
) -> None:
    register_secret("wrong-tunnel-pw")
    if case == "refused":
        data = tunnel_spec(free_port())
    else:
        data = tunnel_spec(sshd.port, password="wrong-tunnel-pw", host_key=sshd.host_key_line)
    result = call(capsys, "check", str(write_spec(tmp_path, data)), "--timeout", "5")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "check failed (tunnel, exit 4)" in result.stderr
    assert "ehtunnel@127.0.0.1" in result.stderr


def test_bench_runs_each_benchmark_quick_and_stops_at_a_failure(tmp_path: Path) -> None:
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    script = "import sys\nprint('{name} ran with', sys.argv[1:])\nsys.exit({code})\n"
    (folder / "bench_a.py").write_text(script.format(name="a", code=0))
    (folder / "bench_b.py").write_text(script.format(name="b", code=9))
    (folder / "bench_c.py").write_text(script.format(name="c", code=0))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ENGINEHOUSE_BENCHMARKS_DIR": str(folder)}
    result = subprocess.run(
        [sys.executable, "-m", "enginehouse", "bench"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 9
    assert "a ran with ['--quick']" in result.stdout
    assert "b ran with ['--quick']" in result.stdout
    assert "c ran with" not in result.stdout
    assert "bench_b failed with exit code 9" in result.stderr
    full = subprocess.run(
        [sys.executable, "-m", "enginehouse", "bench", "bench_c", "--full"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert full.returncode == 0
    assert "c ran with []" in full.stdout


def test_check_mariadb_wrong_password(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    mysql = os.environ.get("ENGINEHOUSE_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")
    uri = mysql.replace("://root@", f"://no_such_user_eh:{PASSWORD}@")
    result = call(capsys, "check", str(write_spec(tmp_path, {"id": 3, "uri": uri})))
    assert result.returncode == 5, result.stdout + result.stderr
    assert "Access denied for user 'no_such_user_eh'" in result.stderr


def test_demo_runs_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    result = call(capsys, "demo", "--databases", "2", "--threads", "2", "--queries", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert call(capsys, "demo", "--no-such-option").returncode == 2


def test_check_applies_the_uri_safety_rules(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = write_spec(tmp_path, {"id": 4, "uri": f"sqlite:///{tmp_path / 'local.db'}"})
    refused = call(capsys, "check", str(spec))
    assert refused.returncode == 2
    assert "sqlite-file" in refused.stderr
    monkeypatch.setenv("ENGINEHOUSE_FORBID_UNSAFE_URIS", "false")
    assert call(capsys, "check", str(spec)).returncode == 0


def test_verbose_shows_lifecycle_logs_masked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import logging

    logger = logging.getLogger("enginehouse")
    handlers, level = list(logger.handlers), logger.level
    spec = write_spec(tmp_path, {"id": 12, "uri": with_password(PG)})
    result = call(capsys, "-v", "check", str(spec))  # call() also scans stderr for the password
    assert result.returncode == 0
    assert "INFO enginehouse.supervisor: started registry" in result.stderr
    assert "INFO enginehouse.manager: manager shut down" in result.stderr
    assert logger.handlers == handlers and logger.level == level  # left as it was
