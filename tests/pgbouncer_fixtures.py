"""A throwaway PgBouncer in front of the machine's PostgreSQL (transaction pooling).

``scripts/install-pgbouncer.sh`` installs it with apt-get when missing.
PgBouncer refuses to run as root, so it runs as the ``postgres`` user with its
own ini, auth file (``auth_type = trust``, listing postgres), log and pid file
in a temporary directory, on a free loopback port. Engines reach it with
psycopg's ``prepare_threshold=None``: in transaction mode a server connection
changes under the client, and automatic prepared statements would hit the
wrong one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from enginehouse.compat import postgres_uri

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")


def pgbouncer_binary() -> str:
    for path in CANDIDATES:
        if os.path.exists(path):
            return path
    found = shutil.which("pgbouncer")
    if found:
        return found
    from service_rule import service_unavailable

    try:
        script = str(ROOT / "scripts" / "install-pgbouncer.sh")
        subprocess.run(["sh", script], check=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        service_unavailable("pgbouncer", f"scripts/install-pgbouncer.sh failed ({exc})")
    for path in CANDIDATES:
        if os.path.exists(path):
            return path
    service_unavailable("pgbouncer", "still missing after scripts/install-pgbouncer.sh")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgBouncer:
    """One PgBouncer process; ``uri`` is what an engine connects to."""

    def __init__(self, pool_size: int, *, server_port: int = 5432, database: str = "test") -> None:
        self.pool_size = pool_size
        self.port = _free_port()
        self.database = database
        self.directory = Path(tempfile.mkdtemp(prefix="eh-pgbouncer-"))
        self.uri = postgres_uri(f"postgres@127.0.0.1:{self.port}/{database}")
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/{database}"
        self._server_port = server_port
        self.process: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> Path:
        d = self.directory
        (d / "users.txt").write_text('"postgres" ""\n')
        ini = d / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"{self.database} = host=127.0.0.1 port={self._server_port} dbname={self.database}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {d / 'users.txt'}\n"
            "admin_users = postgres\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            "max_client_conn = 500\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {d / 'pgbouncer.log'}\n"
            f"pidfile = {d / 'pgbouncer.pid'}\n"
        )
        os.chmod(d, 0o755)
        shutil.chown(d, user="postgres")
        for path in d.iterdir():
            shutil.chown(path, user="postgres")
        return ini

    def start(self) -> None:
        binary = pgbouncer_binary()
        ini = self._write_config()
        command = [binary, str(ini)]
        if os.geteuid() == 0:  # PgBouncer refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with psycopg.connect(self.dsn, prepare_threshold=None, connect_timeout=2) as c:
                    c.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.directory / "pgbouncer.log")
                    text = log.read_text()[-2000:] if log.exists() else ""
                    raise RuntimeError(f"pgbouncer did not start: {text}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
            self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def show(self, what: str) -> list[dict[str, object]]:
        """``SHOW <what>`` on the admin console, as dicts."""
        admin = f"postgresql://postgres@127.0.0.1:{self.port}/pgbouncer"
        with psycopg.connect(admin, autocommit=True, prepare_threshold=None) as connection:
            cursor = connection.execute(f"SHOW {what}")
            names = [column.name for column in cursor.description or []]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


@pytest.fixture
def pgbouncer() -> Iterator[PgBouncer]:
    """PgBouncer, transaction mode, 4 server connections to the ``test`` database."""
    bouncer = PgBouncer(pool_size=4)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()
