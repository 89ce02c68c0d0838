"""Stock Apache Superset 6.1.0, served for real: build, configure, start, drive, stop.

Shared by the end-to-end tests (tests/superset_e2e/) and benchmarks/bench_superset.py; no pytest
in here. Superset runs from ``.venv/superset`` (scripts/superset-env.sh), in processes of its
own: gunicorn (each server in its own process group) and a Celery prefork worker, all with one
``superset_config.py`` per variant (stock, or with enginehouse's two lines) and one PostgreSQL
metadata database of the run's own. The caller drives Superset through its REST API
(:class:`SupersetClient`) and watches from outside: PostgreSQL's statistics
(:func:`sessions_opened`), sshd's log (:func:`ssh_logins`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[2]
ENV_SCRIPT = ROOT / "scripts" / "superset-env.sh"
PG_ADMIN = os.environ.get("ENGINEHOUSE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
PG_HOST, PG_PORT = "127.0.0.1", 5432
MYSQL_URI = "mysql+pymysql://root@127.0.0.1:3306/test"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
ADMIN_USER, ADMIN_PASSWORD = "admin", "admin-e2e-pw-4821"
ENGINEHOUSE_LINES = "from enginehouse.superset import install\nFLASK_APP_MUTATOR = install\n"
ACCESS_FORMAT = 'access pid=%(p)s "%(r)s" %(s)s %(D)sus'
"""gunicorn's access log line: which worker served which request (see Server.warm_up), and
how long the server took (microseconds; bench_superset compares it with the client's time)."""
START_TIMEOUT = 180.0  # gunicorn imports all of Superset: 20-40 s idle, much more on a busy box


class SupersetUnavailable(RuntimeError):
    """Superset's environment could not be built (e.g. no package index): tests skip."""


# -- the environment ------------------------------------------------------------------------


def superset_python() -> Path:
    """Build (or reuse) .venv/superset and return its interpreter."""
    try:
        done = subprocess.run(
            ["bash", str(ENV_SCRIPT)], capture_output=True, text=True, timeout=900
        )
    except subprocess.TimeoutExpired as exc:
        raise SupersetUnavailable("scripts/superset-env.sh timed out") from exc
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise SupersetUnavailable(f"scripts/superset-env.sh failed: {tail}")
    return Path(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- PostgreSQL: databases of the run's own, and what the server saw ------------------------


def admin_engine() -> sa.engine.Engine:
    return sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def create_database(name: str) -> str:
    """A fresh PostgreSQL database; returns its URI (psycopg2 driver: Superset's)."""
    with admin_engine().connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"


def drop_database(name: str) -> None:
    with admin_engine().connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def backends(dbname: str) -> int:
    """Server connections open to ``dbname`` right now."""
    with admin_engine().connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"), {"d": dbname}
            ).scalar_one()
        )


def sessions_opened(dbname: str) -> int:
    """``pg_stat_database.sessions`` of ``dbname``: sessions ever started there.

    A backend reports its session at exit at the latest (PostgreSQL 15 keeps it pending
    while it lives); :func:`settled_sessions` closes them first for an exact figure.
    """
    with admin_engine().connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT sessions FROM pg_stat_database WHERE datname = :d"), {"d": dbname}
            ).scalar_one()
        )


def terminate_backends(dbname: str) -> None:
    with admin_engine().connect() as conn:
        conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :d AND pid <> pg_backend_pid()"
            ),
            {"d": dbname},
        )


def settled_sessions(dbname: str, timeout: float = 30.0) -> int:
    """Close every session on ``dbname``, wait until none is left, then read the counter.

    Pools reconnect on their next use (pre-ping): callers count that reconnect in the next
    window, so use this at the end of a measurement.
    """
    deadline = time.monotonic() + timeout
    while True:
        terminate_backends(dbname)
        if backends(dbname) == 0:
            return sessions_opened(dbname)
        if time.monotonic() > deadline:
            raise TimeoutError(f"sessions on {dbname} did not end within {timeout:g}s")
        time.sleep(0.05)


class PeakSampler:
    """Samples how many server connections ``dbname`` has, in a thread; keeps the peak."""

    def __init__(self, dbname: str, interval: float = 0.005) -> None:
        self.dbname, self.interval = dbname, interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-peak-sampler", daemon=True)

    def _run(self) -> None:
        engine = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        query = sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d")
        with engine.connect() as conn:
            while not self._stop.is_set():
                count = int(conn.execute(query, {"d": self.dbname}).scalar_one())
                self.peak = max(self.peak, count)
                self.samples += 1
                self._stop.wait(self.interval)
        engine.dispose()

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# -- sshd's log -----------------------------------------------------------------------------

ACCEPTED = re.compile(r"Accepted (?:publickey|password) for \S+ from \S+ port \d+")


def ssh_logins(log: Path) -> int:
    """Successful SSH logins recorded in an sshd log (needs LogLevel INFO or more)."""
    if not log.exists():
        return 0
    return len(ACCEPTED.findall(log.read_text(errors="replace")))


# -- processes ------------------------------------------------------------------------------


@dataclass
class Process:
    """A child in a process group of its own, its output in ``log``."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def group_alive(self) -> bool:
        """Whether any process of its group (gunicorn's workers, Celery's children) lives."""
        return _group_alive(self.popen.pid)

    def stop(self, timeout: float = 8.0) -> None:
        """SIGTERM the whole group, SIGKILL what is left after ``timeout``."""
        stop_all([self], timeout)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def stop_all(processes: list[Process], timeout: float = 8.0) -> None:
    """SIGTERM every group at once, then SIGKILL those still alive after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in processes:
            process.signal(sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.group_alive() for p in processes):
            for process in processes:
                process.popen.poll()
            time.sleep(0.05)
    for process in processes:
        process.popen.poll()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies still count for killpg; ask ps for live members only.
    found = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True)
    return any(not stat.startswith("Z") for stat in found.stdout.split())


# -- Superset itself ------------------------------------------------------------------------


@dataclass
class Variant:
    """One superset_config.py: stock, or with enginehouse (``mode``: new or singleton)."""

    name: str
    enginehouse_mode: str | None = None  # None: stock Superset
    extra_config: str = ""

    def config_lines(self) -> str:
        if self.enginehouse_mode is None:
            return "# stock Superset: no engine manager\n"
        return f'ENGINE_MANAGER_MODE = "{self.enginehouse_mode}"\n{ENGINEHOUSE_LINES}'


@dataclass
class SupersetSite:
    """Everything one run of Superset needs: venv, metadata DB, Redis db, configs, processes."""

    workdir: Path
    python: Path
    redis_db: int = 13
    meta_name: str = field(default_factory=lambda: f"superset_meta_{os.getpid()}")
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bin = self.python.parent
        self.queue = f"superset_e2e_{os.getpid()}_{secrets.token_hex(3)}"
        self.secret_key = secrets.token_urlsafe(32)
        self.meta_uri = ""

    # -- configuration ------------------------------------------------------------------

    def config_path(self, variant: Variant) -> Path:
        path = self.workdir / variant.name / "superset_config.py"
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        redis = f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.redis_db}"
        path.write_text(
            f'''"""superset_config.py of the end-to-end run, variant {variant.name}."""
import pymysql
from flask_caching.backends.rediscache import RedisCache

# Superset's MySQL spec imports MySQLdb (mysqlclient, a C build) for SQL Lab's column types;
# PyMySQL stands in for it.
pymysql.install_as_MySQLdb()

SECRET_KEY = {self.secret_key!r}
SQLALCHEMY_DATABASE_URI = {self.meta_uri!r}
SQLALCHEMY_ENGINE_OPTIONS = {{"pool_size": 2, "max_overflow": 6, "pool_pre_ping": True}}
WTF_CSRF_ENABLED = False
FEATURE_FLAGS = {{"SSH_TUNNELING": True, "ALERT_REPORTS": True}}
SQLLAB_CTAS_NO_LIMIT = True
RESULTS_BACKEND = RedisCache(host={REDIS_HOST!r}, port={REDIS_PORT}, db={self.redis_db},
                             key_prefix={self.queue + "_results_"!r})
DISALLOWED_SQL_FUNCTIONS = {{}}  # the tests read current_database(), sleep with pg_sleep()
CACHE_CONFIG = {{"CACHE_TYPE": "NullCache"}}
DATA_DISALLOWED_SQL_FUNCTIONS = {{}}  # the tests read current_database(), sleep with pg_sleep()
CACHE_CONFIG = {{"CACHE_TYPE": "NullCache"}}


class CeleryConfig:
    broker_url = {redis!r}
    result_backend = {redis!r}
    imports = ("superset.sql_lab",)
    task_default_queue = {self.queue!r}
    worker_prefetch_multiplier = 1
    task_acks_late = False
    broker_connection_retry_on_startup = True


CELERY_CONFIG = CeleryConfig
{variant.config_lines()}{variant.extra_config}
'''
        )
        return path

    def env(self, variant: Variant) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update(
            SUPERSET_CONFIG_PATH=str(self.config_path(variant)),
            FLASK_APP="superset",
            PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
            PYTHONUNBUFFERED="1",
        )
        return env

    # -- one-time setup -----------------------------------------------------------------

    def prepare(self, stock: Variant) -> None:
        """Metadata database, schema, admin user, roles: ``superset db upgrade``,
        ``fab create-admin`` and ``init``, in one process (Superset's import is the slow part).
        """
        self.meta_uri = create_database(self.meta_name)
        commands = [
            ["db", "upgrade"],
            ["fab", "create-admin", "--username", ADMIN_USER, "--firstname", "A",
             "--lastname", "B", "--email", "admin@example.com", "--password", ADMIN_PASSWORD],
            ["init"],
        ]
        script = (
            "import sys\n"
            "from superset.cli.main import superset\n"
            f"for args in {commands!r}:\n"
            "    superset.main(args, prog_name='superset', standalone_mode=False)\n"
        )
        log = self.workdir / "superset-cli.log"
        with open(log, "ab") as out:
            done = subprocess.run(
                [str(self.python), "-c", script], env=self.env(stock), cwd=self.workdir,
                stdout=out, stderr=subprocess.STDOUT, timeout=900,
            )
        if done.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"superset db upgrade / create-admin / init failed:\n{tail}")

    # -- servers ------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], variant: Variant) -> Process:
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                argv, env=self.env(variant), cwd=self.workdir, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def start_gunicorn(
        self, variant: Variant, *, worker_class: str = "gthread", workers: int = 2,
        wait: bool = True,
    ) -> Server:
        port = free_port()
        name = f"gunicorn-{variant.name}-{worker_class}-{port}"
        argv = [
            str(self.bin / "gunicorn"), "-w", str(workers), "-k", worker_class,
            "-b", f"127.0.0.1:{port}", "--timeout", "120", "--graceful-timeout", "5",
            "--limit-request-line", "0", "--limit-request-field_size", "0",
            "--access-logfile", "-", "--access-logformat", ACCESS_FORMAT,
        ]
        if worker_class == "gthread":
            argv += ["--threads", "4"]
        else:
            argv += ["--worker-connections", "100"]
        argv.append("superset.app:create_app()")
        server = Server(self._spawn(name, argv, variant), f"http://127.0.0.1:{port}", workers)
        if wait:
            server.wait_healthy()
        return server

    def start_celery(self, variant: Variant, concurrency: int = 2, wait: bool = True) -> Process:
        argv = [
            str(self.bin / "celery"), "--app=superset.tasks.celery_app:app", "worker",
            "--pool=prefork", f"--concurrency={concurrency}", "-Q", self.queue,
            "--loglevel=INFO", "-n", f"{self.queue}@%h", "--without-gossip", "--without-mingle",
        ]
        process = self._spawn(f"celery-{variant.name}", argv, variant)
        if wait:
            celery_ready(process)
        return process

    def send_task(self, name: str, args: list[Any]) -> str:
        """Queue Celery task ``name`` for this site's worker, due now, as Superset's beat does
        (with an ETA: ``reports.execute`` logs it as the scheduled time); returns its id.

        Sent from ``.venv/superset`` by Celery's client alone: no Superset import, no app.
        """
        script = (
            "import datetime, json, sys\n"
            "from celery import Celery\n"
            "app = Celery(broker=sys.argv[1])\n"
            "due = datetime.datetime.now(datetime.timezone.utc)\n"
            "sent = app.send_task(sys.argv[2], args=json.loads(sys.argv[3]), queue=sys.argv[4],"
            " eta=due)\n"
            "print(sent.id)\n"
        )
        broker = f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.redis_db}"
        done = subprocess.run(
            [str(self.python), "-c", script, broker, name, json.dumps(args), self.queue],
            capture_output=True, text=True, timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"sending {name} failed: {done.stderr[-800:]}")
        return done.stdout.strip()

    def logs(self) -> dict[str, str]:
        """Every log this run wrote (servers, workers, CLI), by file name."""
        return {p.name: p.read_text(errors="replace") for p in self.workdir.glob("*.log")}

    def close(self) -> None:
        """Stop every process group; drop the metadata database; forget the Redis keys."""
        stop_all(self.processes)
        self.processes.clear()
        with contextlib.suppress(Exception):
            drop_database(self.meta_name)
        with contextlib.suppress(Exception):
            import redis  # the test stacks have it; a missing one leaves keys that expire

            client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=self.redis_db)
            for key in client.scan_iter(f"*{self.queue}*"):
                client.delete(key)


def celery_ready(process: Process) -> None:
    """Wait until the worker logged "ready."; RuntimeError with its log tail if it died."""
    wait_for(lambda: "ready." in process.log.read_text(errors="replace") or not process.alive(),
             START_TIMEOUT, "the Celery worker to be ready")
    if not process.alive():
        raise RuntimeError(f"celery worker exited:\n{process.tail()}")


@dataclass
class Server:
    """One gunicorn serving Superset."""

    process: Process
    url: str
    workers: int

    def wait_healthy(self) -> None:
        def healthy() -> bool:
            if not self.process.alive():
                raise RuntimeError(f"gunicorn exited:\n{self.process.tail()}")
            try:
                return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, START_TIMEOUT, f"{self.process.name} /health")
        # /health answers from the first worker; let the others finish importing too.
        wait_for(lambda: len(self.worker_pids()) >= self.workers, START_TIMEOUT, "workers")

    def worker_pids(self) -> list[int]:
        found = subprocess.run(
            ["pgrep", "-P", str(self.process.popen.pid)], capture_output=True, text=True
        )
        return [int(pid) for pid in found.stdout.split()]

    def client(self) -> SupersetClient:
        return SupersetClient(self.url)

    def warm_up(self, database_id: int, timeout: float = 120.0) -> None:
        """Run SQL Lab queries until every worker has served one.

        Stock Superset binds its Celery task lazily and races there: the first synchronous
        queries of a worker, when concurrent, can fail with "'NoneType' object has no
        attribute 'push'". Each query goes on a new connection (no keep-alive), so the
        workers share them; gunicorn's access log tells which worker served which.
        """
        pattern = re.compile(r'access pid=<(\d+)> "POST /api/v1/sqllab/execute/ [^"]*" 200')
        with SupersetClient(self.url, keepalive=False) as client:

            def every_worker_served() -> bool:
                client.query_rows(database_id, "SELECT 1 AS one")
                served = {int(pid) for pid in pattern.findall(self.process.log.read_text())}
                return set(self.worker_pids()) <= served

            wait_for(every_worker_served, timeout, f"every worker of {self.process.name}")


SERVED = re.compile(r'"POST /api/v1/sqllab/execute/ [^"]*" 200 (\d+)us')


def served_times(log: Path) -> list[float]:
    """Seconds gunicorn took for each successful SQL Lab execute in ``log``, in order."""
    return [int(us) / 1e6 for us in SERVED.findall(log.read_text(errors="replace"))]


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``predicate`` until truthy; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


# -- the REST client ------------------------------------------------------------------------


class SupersetError(RuntimeError):
    """Superset answered with an unexpected status; carries the status and the body."""

    def __init__(self, what: str, status: int, body: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:800]}")
        self.status = status
        self.body = body


class SupersetClient:
    """Superset's REST API as the admin user: login, CSRF token, databases, SQL Lab, charts."""

    def __init__(self, url: str, timeout: float = 120.0, keepalive: bool = True) -> None:
        limits = httpx.Limits() if keepalive else httpx.Limits(max_keepalive_connections=0)
        self.http = httpx.Client(base_url=url, timeout=timeout, limits=limits)
        self.login()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> SupersetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def login(self) -> None:
        answer = self.http.post(
            "/api/v1/security/login",
            json={"username": ADMIN_USER, "password": ADMIN_PASSWORD, "provider": "db",
                  "refresh": True},
        )
        token = self._json("login", answer, 200)["access_token"]
        self.http.headers.update(
            {"Authorization": f"Bearer {token}", "Referer": str(self.http.base_url)}
        )
        csrf = self._json("csrf", self.http.get("/api/v1/security/csrf_token/"), 200)["result"]
        self.http.headers["X-CSRFToken"] = csrf

    @staticmethod
    def _json(what: str, answer: httpx.Response, *ok: int) -> Any:
        if answer.status_code not in ok:
            raise SupersetError(what, answer.status_code, answer.text)
        return answer.json()

    # -- databases ----------------------------------------------------------------------

    def create_database(self, name: str, uri: str, **fields: Any) -> int:
        payload = database_payload(name, uri, **fields)
        answer = self.http.post("/api/v1/database/", json=payload)
        return int(self._json(f"create database {name}", answer, 201)["id"])

    def test_connection(self, name: str, uri: str, **fields: Any) -> httpx.Response:
        payload = database_payload(name, uri, **fields)
        for key in ("allow_run_async", "expose_in_sqllab"):  # not in test_connection's schema
            payload.pop(key)
        return self.http.post("/api/v1/database/test_connection/", json=payload)

    def database(self, database_id: int) -> dict[str, Any]:
        answer = self.http.get(f"/api/v1/database/{database_id}")
        return dict(self._json("get database", answer, 200)["result"])

    def schemas(self, database_id: int) -> list[str]:
        answer = self.http.get(f"/api/v1/database/{database_id}/schemas/")
        return list(self._json("schemas", answer, 200)["result"])

    # -- SQL Lab ------------------------------------------------------------------------

    def execute(
        self, database_id: int, sql: str, *, run_async: bool = False, editor: str = "e2e"
    ) -> dict[str, Any]:
        """SQL Lab's execute; synchronous: the result; asynchronous: the pending query."""
        payload = {
            "database_id": database_id, "sql": sql, "runAsync": run_async,
            "client_id": uuid.uuid4().hex[:10], "sql_editor_id": editor, "tab": "e2e",
            "queryLimit": 1000, "schema": None, "select_as_cta": False, "ctas_method": "TABLE",
            "templateParams": "", "expand_data": True,
        }
        answer = self.http.post("/api/v1/sqllab/execute/", json=payload)
        return dict(self._json("sqllab execute", answer, 200, 202))

    def query_rows(self, database_id: int, sql: str) -> list[dict[str, Any]]:
        """Run ``sql`` synchronously; its rows (fails on anything but success)."""
        result = self.execute(database_id, sql)
        if result.get("status") != "success":
            raise SupersetError("sqllab execute", 200, json.dumps(result))
        return list(result["data"])

    def execute_async(self, database_id: int, sql: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run ``sql`` through Celery; poll the query until done, then fetch its results."""
        since = int(time.time() * 1000) - 5000
        client_id = self.execute(database_id, sql, run_async=True)["query"]["id"]

        def finished() -> dict[str, Any] | None:
            answer = self.http.get(
                "/api/v1/query/updated_since", params={"q": f"(last_updated_ms:{since})"}
            )
            found = self._json("queries updated since", answer, 200)["result"]
            done = [q for q in found if q["id"] == client_id
                    and q["state"] in ("success", "failed", "stopped")]
            return done[0] if done else None

        query = wait_for(finished, timeout, f"async query {client_id}")
        assert isinstance(query, dict)
        if query["state"] != "success":
            raise SupersetError("async query", 200, json.dumps(query))
        key = query["resultsKey"]
        answer = self.http.get("/api/v1/sqllab/results/", params={"q": f"(key:'{key}')"})
        return dict(self._json("sqllab results", answer, 200))

    # -- alerts and reports ------------------------------------------------------------

    def create_alert(
        self, name: str, database_id: int, sql: str, *, chart: int, op: str, threshold: float
    ) -> int:
        """An active SQL alert on ``database_id`` with an operator validator, about ``chart``
        (what a triggered alert would send; no recipients: an alert that does not trigger
        sends nothing); Superset schedules it daily."""
        body = {
            "type": "Alert", "name": name, "crontab": "0 0 * * *", "timezone": "UTC",
            "database": database_id, "sql": sql, "active": True, "chart": chart,
            "validator_type": "operator",
            "validator_config_json": {"op": op, "threshold": threshold},
            "recipients": [],
        }
        answer = self.http.post("/api/v1/report/", json=body)
        return int(self._json("create alert", answer, 201)["id"])

    def report_logs(self, report_id: int) -> list[dict[str, Any]]:
        """The execution log of a report or alert (``state``, ``value``, ``error_message``...)."""
        answer = self.http.get(f"/api/v1/report/{report_id}/log/",
                               params={"q": "(page_size:100)"})
        return list(self._json("report log", answer, 200)["result"])

    # -- datasets and charts ------------------------------------------------------------

    def create_dataset(self, database_id: int, table: str, schema: str = "public") -> int:
        body = {"database": database_id, "schema": schema, "table_name": table}
        answer = self.http.post("/api/v1/dataset/", json=body)
        return int(self._json("create dataset", answer, 201)["id"])

    def create_chart(self, dataset_id: int, name: str, params: dict[str, Any]) -> int:
        answer = self.http.post(
            "/api/v1/chart/",
            json={"slice_name": name, "viz_type": "table", "datasource_id": dataset_id,
                  "datasource_type": "table", "params": json.dumps(params)},
        )
        return int(self._json("create chart", answer, 201)["id"])

    def chart_data(self, dataset_id: int, chart_id: int, query: dict[str, Any]) -> dict[str, Any]:
        body = {
            "datasource": {"id": dataset_id, "type": "table"},
            "form_data": {"slice_id": chart_id},
            "queries": [query],
            "result_format": "json",
            "result_type": "full",
            "force": True,
        }
        answer = self.http.post("/api/v1/chart/data", json=body)
        return dict(self._json("chart data", answer, 200))


def database_payload(name: str, uri: str, **fields: Any) -> dict[str, Any]:
    """A /api/v1/database/ body; ``extra``/``masked_encrypted_extra`` dicts become JSON text."""
    payload: dict[str, Any] = {
        "database_name": name, "sqlalchemy_uri": uri, "expose_in_sqllab": True,
        "allow_run_async": True,
    }
    for key, value in fields.items():
        payload[key] = json.dumps(value) if key in ("extra", "masked_encrypted_extra") else value
    return payload


# -- one run, as a context manager ----------------------------------------------------------


@contextlib.contextmanager
def superset_site(stock: Variant, redis_db: int = 13) -> Iterator[SupersetSite]:
    """Build the env, prepare a site in a temp dir; stop everything and drop its DB after."""
    python = superset_python()
    workdir = Path(tempfile.mkdtemp(prefix="enginehouse-superset-"))
    site = SupersetSite(workdir=workdir, python=python, redis_db=redis_db)
    try:
        site.prepare(stock)
        yield site
    finally:
        site.close()
        if not os.environ.get("ENGINEHOUSE_KEEP_SUPERSET_LOGS"):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"superset logs kept in {workdir}", file=sys.stderr)
