"""Under gevent, psycopg2 through an enginehouse SSH tunnel answers once made cooperative.

Runs in a gevent-patched child interpreter that has gevent, psycopg2 and
psycogreen: this stack's own, else .venv/superset (scripts/superset-env.sh),
else the test skips. Without the wait callback the same query blocks the
process and the relay greenlet never runs (measured: docs/superset.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sshd_fixtures import PASSWORD, USER, ThrowawaySshd

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
from gevent import monkey
monkey.patch_all()
import os
from sqlalchemy import text
from enginehouse import DatabaseSpec, EngineManager, SSHTunnelSpec
from enginehouse.integrations.superset.cooperative import make_psycopg2_cooperative

assert make_psycopg2_cooperative(), "gevent not detected"
tunnel = SSHTunnelSpec(
    server_address="127.0.0.1", server_port=int(os.environ["SSHD_PORT"]),
    username=os.environ["SSHD_USER"], password=os.environ["SSHD_PASSWORD"],
)
uri = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
spec = DatabaseSpec(id=1, uri=uri, ssh_tunnel=tunnel)
with EngineManager(mode="singleton", cleanup_interval=60, ask_timeout=20) as manager:
    for _ in range(5):
        with manager.connect(spec) as connection:
            print(connection.execute(text("select 41 + 1")).scalar())
"""
PRELOADED = """
from gevent import monkey
monkey.patch_all()
import os
from types import SimpleNamespace
from sqlalchemy import create_engine, pool, text
from enginehouse import EngineManager
from enginehouse.integrations.superset.config import TunnelOptions
from enginehouse.integrations.superset.ssh import SSHManager

# As under gunicorn --preload: install() ran before gevent patched, so nothing was made
# cooperative yet; Superset's first tunnel must do it.
bastion = SimpleNamespace(
    server_address="127.0.0.1", server_port=int(os.environ["SSHD_PORT"]),
    username=os.environ["SSHD_USER"], password=os.environ["SSHD_PASSWORD"],
    private_key=None, private_key_password=None, database_id=7,
)
uri = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
with EngineManager(mode="new", cleanup_interval=60, ask_timeout=20) as manager:
    ssh = SSHManager(lambda: manager, TunnelOptions())
    with ssh.create_tunnel(ssh_tunnel=bastion, sqlalchemy_database_uri=uri) as server:
        engine = create_engine(ssh.build_sqla_url(uri, server), poolclass=pool.NullPool)
        with engine.connect() as connection:
            print(connection.execute(text("select 6 * 7")).scalar())
"""
NEEDS = "import gevent, psycogreen, psycopg2, enginehouse"


def _interpreter() -> str | None:
    candidates = [sys.executable, str(ROOT / ".venv" / "superset" / "bin" / "python")]
    for python in candidates:
        if not Path(python).exists():
            continue
        probe = subprocess.run([python, "-c", NEEDS], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return python
    return None


@pytest.mark.parametrize(
    ("child", "runs"), [(CHILD, 5), (PRELOADED, 1)], ids=["install", "preload"]
)
def test_psycopg2_queries_through_a_tunnel_under_gevent(
    sshd: ThrowawaySshd, child: str, runs: int
) -> None:
    python = _interpreter()
    if python is None:
        pytest.skip(
            "no interpreter with gevent, psycogreen and psycopg2 (run scripts/superset-env.sh)"
        )
    env = {**os.environ, "SSHD_PORT": str(sshd.port), "SSHD_USER": USER, "SSHD_PASSWORD": PASSWORD}
    done = subprocess.run(
        [python, "-c", child], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["42"] * runs
    assert PASSWORD not in done.stderr
