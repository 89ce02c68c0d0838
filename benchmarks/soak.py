"""A fault-injection soak (issue 13): mixed traffic through enginehouse while faults arrive.

    python -m benchmarks.soak            # full run (~3 min), JSON + plot into docs/img/soak.png
    python -m benchmarks.soak --short    # ~40 s (tests/test_soak.py runs it), no plot

Several worker processes (multiprocessing, spawn) x threads run mixed traffic
through one ``EngineManager`` each, on its DEFAULT settings except
``fleet_url``: PostgreSQL direct with a fleet cap (``extra.max_connections``)
leased in a Redis of the soak's own (a private ``redis-server`` it starts and
kills; the shared 6379 is never touched), MariaDB, and PostgreSQL through a
throwaway sshd (tests/sshd_fixtures.py) reached through a TCP relay the soak
can black-hole. Faults arrive on a schedule (:data:`FULL`, :data:`SHORT`):
Redis killed and restarted, Redis answering OOM errors, Redis stalled
(``DEBUG SLEEP``), SSH sessions killed, the bastion black-holed, server
connections terminated, actors crashed, a worker SIGKILLed (and restarted),
file descriptors exhausted in one process.

The report (JSON in benchmarks/results/soak-*.json, a table on stdout):
queries ok and failed by error class (only ``EngineManagerError`` subclasses
may reach callers; SQLAlchemy's ``DBAPIError`` from the server is listed
apart; anything else is a defect, with a sample message), peak server
connections against the cap (sampled from pg_stat_activity), permits
outstanding in Redis after the run, each worker's permits (``stats()``)
against its server connections once traffic stopped, threads and server
connections left after shutdown, secrets found in the captured logs, and per
fault the time to recover (first success of each kind after it ended), the
failures until then and the longest call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import queue
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PLOTS_DIR,
    ROOT,
    machine_info,
    plotting_available,
    utc_now,
    write_results,
)
from enginehouse.compat import postgres_uri

sys.path.insert(0, str(ROOT / "tests"))

KINDS = ("pg", "mysql", "ssh")
"""Traffic kinds: PostgreSQL direct (fleet-capped), MariaDB, PostgreSQL through the bastion."""
CAP = 6
"""``extra.max_connections`` of the PostgreSQL-direct database, across every worker."""
BUCKET = 0.1
"""Seconds per bucket of the outcome timeline (the resolution of recovery times)."""
SLOW = 1.0
"""Calls (connect + query) longer than this are listed with their start and duration."""
PG_PASSWORD = "soak-pg-secret-7f3a"
"""Sent in the PostgreSQL URI (the server trusts 127.0.0.1 and ignores it): never to be logged."""
REDIS_PASSWORD = "soak-redis-secret-91c4"
"""The private Redis's ``requirepass``, in ``fleet_url``: must never be logged."""
RECYCLE = 3
"""``pool_recycle`` of the capped PostgreSQL database: its connections, and so its permits,
are replaced every few seconds (the fleet budget is asked all along, not only at first)."""
SQL = {"pg": "SELECT pg_sleep(0.005)", "mysql": "SELECT 1", "ssh": "SELECT 1"}


def _pg_uri() -> str:
    """PostgreSQL's URI for this stack (psycopg 3 needs SQLAlchemy 2), with the soak's password."""
    uri = os.environ.get("ENGINEHOUSE_TEST_PG", postgres_uri("postgres@127.0.0.1:5432/test"))
    return uri.replace("postgres@", f"postgres:{PG_PASSWORD}@", 1)


MYSQL_URI = os.environ.get("ENGINEHOUSE_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")


# -- the fault schedule ---------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One scheduled fault: ``at`` s after traffic starts, lasting ``seconds`` (0: instant)."""

    name: str
    at: float
    seconds: float = 0.0
    worker: int | None = None  # faults aimed at one worker process
    what: str = ""


@dataclass(frozen=True)
class Schedule:
    duration: float
    processes: int
    threads: dict[str, int]
    faults: tuple[Fault, ...]


FULL = Schedule(
    duration=180.0,
    processes=3,
    threads={"pg": 3, "mysql": 2, "ssh": 2},
    faults=(
        Fault("pg_terminate", 15, what="pg_terminate_backend on every soak connection"),
        Fault("redis_kill", 25, 10, what="Redis SIGKILLed, restarted empty on the same port"),
        Fault("redis_oom", 45, 8, what="CONFIG SET maxmemory 1: writes answer OOM"),
        Fault("redis_stall", 60, 3, what="DEBUG SLEEP 3: Redis answers nothing"),
        Fault("ssh_sessions_killed", 70, what="every sshd session process SIGKILLed"),
        Fault("bastion_blackhole", 80, 15, what="the relay in front of sshd forwards nothing"),
        Fault("actor_crash", 105, what="EngineRegistry and BudgetKeeper sent an unknown message"),
        Fault("worker_sigkill", 115, worker=0, what="worker 0 SIGKILLed, a new one started"),
        Fault("fd_exhaustion", 130, 10, worker=1, what="RLIMIT_NOFILE lowered and filled"),
    ),
)
SHORT = Schedule(
    duration=40.0,
    processes=2,
    threads={"pg": 2, "mysql": 1, "ssh": 1},
    faults=(
        Fault("pg_terminate", 3, what=FULL.faults[0].what),
        Fault("redis_kill", 5, 3, what=FULL.faults[1].what),
        Fault("redis_oom", 10, 2, what=FULL.faults[2].what),
        Fault("redis_stall", 13.5, 1.5, what="DEBUG SLEEP 1.5: Redis answers nothing"),
        Fault("ssh_sessions_killed", 16.5, what=FULL.faults[4].what),
        Fault("bastion_blackhole", 18, 4, what=FULL.faults[5].what),
        Fault("actor_crash", 24, what=FULL.faults[6].what),
        Fault("worker_sigkill", 26, worker=0, what=FULL.faults[7].what),
        Fault("fd_exhaustion", 29, 3, worker=1, what=FULL.faults[8].what),
    ),
)


# -- a Redis of the soak's own -------------------------------------------------------------


class SoakRedis:
    """A private ``redis-server`` (password, no persistence) that the soak kills and restarts."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (the project's services need it)")
        self.binary = binary
        self.port = _free_port()
        self.url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{self.port}/0"
        self.log = workdir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            REDIS_PASSWORD,
            "--enable-debug-command",
            "local",
            "--logfile",
            str(self.log),
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _poll(self.answers, 20, f"private redis-server on port {self.port}")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=20)
            self.process = None

    def client(self, timeout: float = 2.0) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=timeout, socket_connect_timeout=1)

    def answers(self) -> bool:
        import redis

        client = self.client(0.5)
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()

    def permits(self) -> dict[str, int]:
        """Permits each process holds, from every ``...:taken:<process>`` list."""
        client = self.client()
        try:
            held = {}
            for key in client.scan_iter(match="*:taken:*"):
                name = key.decode()
                if client.type(key) == b"list":
                    held[name.split(":taken:", 1)[1]] = int(client.llen(key))
            return {process: n for process, n in held.items() if n}
        finally:
            client.close()


# -- a relay in front of sshd that can black-hole ------------------------------------------


class BlackholeRelay:
    """A TCP relay to ``target``; :meth:`blackhole` stops forwarding without closing anything.

    While black-holed, bytes read are held back and new clients are accepted
    but not connected onwards: what a silently dropping firewall looks like
    to both ends. :meth:`heal` lets everything flow again.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flowing = threading.Event()
        self.flowing.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="soak-relay-accept", daemon=True).start()

    def blackhole(self) -> None:
        self.flowing.clear()

    def heal(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self.closed.set()
        self.flowing.set()
        self.listener.close()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self._sockets.append(client)
        self.flowing.wait()
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self._sockets.append(upstream)
        pair = (client, upstream)
        threading.Thread(target=self._pump, args=(upstream, client, pair), daemon=True).start()
        self._pump(client, upstream, pair)

    def _pump(
        self, source: socket.socket, sink: socket.socket, pair: tuple[socket.socket, ...]
    ) -> None:
        try:
            while True:
                self.flowing.wait()
                data = source.recv(65536)
                if not data:
                    break
                self.flowing.wait()  # read while flowing, the window began: hold it back
                sink.sendall(data)
        except OSError:
            pass
        for sock in pair:  # shutdown first: it wakes the other pump, blocked in recv()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
            with contextlib.suppress(ValueError):
                self._sockets.remove(sock)


# -- the worker process ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker process needs (picklable: spawn sends it)."""

    index: int
    generation: int
    run: str
    logdir: str
    threads: dict[str, int]
    fleet_url: str
    pg_uri: str
    mysql_uri: str
    relay_port: int
    ssh_user: str
    ssh_key: str
    ssh_key_passphrase: str
    fd_seconds: float

    @property
    def tag(self) -> str:
        return f"w{self.index}.{self.generation}"

    def application_name(self, kind: str) -> str:
        return f"{self.run}:{kind}:{self.tag}"


def worker_specs(config: WorkerConfig) -> dict[str, Any]:
    """The three databases, one per traffic kind (the same ids in every worker)."""
    from enginehouse import DatabaseSpec, SSHTunnelSpec

    def pg_extra(kind: str, **more: Any) -> dict[str, Any]:
        params: dict[str, Any] = {
            "connect_args": {"application_name": config.application_name(kind)}
        }
        if kind == "pg":
            params["pool_recycle"] = RECYCLE
            more["max_connections"] = CAP
        return {"engine_params": params, **more}

    tunnel = SSHTunnelSpec(
        server_address="127.0.0.1",
        server_port=config.relay_port,
        username=config.ssh_user,
        private_key=config.ssh_key,
        private_key_password=config.ssh_key_passphrase,
    )
    return {
        "pg": DatabaseSpec(id="soak-pg", uri=config.pg_uri, extra=pg_extra("pg")),
        "mysql": DatabaseSpec(id="soak-mysql", uri=config.mysql_uri),
        "ssh": DatabaseSpec(
            id="soak-ssh", uri=config.pg_uri, extra=pg_extra("ssh"), ssh_tunnel=tunnel
        ),
    }


class _Recorder:
    """Outcomes from traffic threads (a SimpleQueue: no lock of ours), flushed as JSON lines."""

    def __init__(self, path: Path, config: WorkerConfig, t0: float) -> None:
        self.events: queue.SimpleQueue[tuple[str, float, float, str | None, str]] = (
            queue.SimpleQueue()
        )
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the process's life
        self.config = config
        self.t0 = t0
        self.samples: dict[str, str] = {}

    def record(self, kind: str, began: float, error: str | None = None, message: str = "") -> None:
        """One call's outcome; ``began`` is its ``time.monotonic()`` at the start."""
        self.events.put((kind, began - self.t0, time.monotonic() - began, error, message))

    def write(self, record: dict[str, Any]) -> None:
        record.update(worker=self.config.index, generation=self.config.generation)
        self.file.write(json.dumps(record, default=str) + "\n")

    def flush(self) -> None:
        ok: dict[str, Counter[int]] = defaultdict(Counter)
        failed: dict[str, Counter[str]] = defaultdict(Counter)
        timeline: dict[str, Counter[int]] = defaultdict(Counter)
        samples: dict[str, str] = {}
        slow: list[tuple[str, float, float]] = []  # (kind, began, seconds) of calls > SLOW
        while True:
            try:
                kind, began, seconds, error, message = self.events.get_nowait()
            except queue.Empty:
                break
            bucket = int((began + seconds) / BUCKET)
            if seconds > SLOW:
                slow.append((kind, round(began, 2), round(seconds, 2)))
            if error is None:
                ok[kind][bucket] += 1
            else:
                failed[kind][error] += 1
                timeline[kind][bucket] += 1
                key = f"{kind} {error}"
                if key not in self.samples:
                    self.samples[key] = samples[key] = message[:3000]
        if ok or failed or slow:
            self.write(
                {
                    "type": "outcomes",
                    "ok": ok,
                    "failed": failed,
                    "failed_at": timeline,
                    "samples": samples,
                    "slow": slow,
                }
            )


def classify(exc: BaseException) -> str:
    """``ours:<Class>``, ``database:<Class>`` (SQLAlchemy's DBAPIError) or ``defect:<Class>``."""
    from sqlalchemy.exc import DBAPIError

    from enginehouse.errors import EngineManagerError

    if isinstance(exc, EngineManagerError):
        return f"ours:{type(exc).__name__}"
    if isinstance(exc, DBAPIError):
        return f"database:{type(exc).__name__}({type(exc.orig).__name__})"
    return f"defect:{type(exc).__module__}.{type(exc).__name__}"


def worker_main(config: WorkerConfig, go: Any, t0_value: Any, stop: Any) -> None:
    """One worker process: traffic threads until ``stop``; then shutdown and leftovers."""
    logdir = Path(config.logdir)
    _capture_output(logdir / f"worker-{config.tag}.out")
    _capture_logs(logdir / f"worker-{config.tag}.log")
    from enginehouse import EngineManager

    specs = worker_specs(config)
    manager = _start_manager(EngineManager, config)
    (logdir / f"ready-{config.tag}").touch()
    go.wait()
    recorder = _Recorder(logdir / f"worker-{config.tag}.jsonl", config, t0_value.value)
    recorder.write({"type": "started", "pid": os.getpid(), "at": time.monotonic() - t0_value.value})
    commands: queue.SimpleQueue[str] = queue.SimpleQueue()
    signal.signal(signal.SIGUSR1, lambda *_: commands.put("crash"))
    signal.signal(signal.SIGUSR2, lambda *_: commands.put("fds"))
    traffic = [
        threading.Thread(
            target=_traffic,
            args=(manager, specs[kind], kind, recorder, stop),
            name=f"soak-{kind}-{n}",
            daemon=True,
        )
        for kind, count in config.threads.items()
        for n in range(count)
    ]
    for thread in traffic:
        thread.start()
    while not stop.is_set():
        with contextlib.suppress(queue.Empty):
            command = commands.get(timeout=0.2)
            if command == "crash":
                recorder.write({"type": "crashed", "actors": crash_actors()})
            elif command == "fds":
                threading.Thread(
                    target=_exhaust_fds,
                    args=(manager, specs, config.fd_seconds, recorder),
                    name="soak-fds",
                    daemon=True,
                ).start()
        recorder.flush()
    _finish(manager, specs, traffic, recorder, config)


def _start_manager(factory: Callable[..., Any], config: WorkerConfig) -> Any:
    """The manager on default settings plus ``fleet_url``; Redis may be down right now."""
    from enginehouse.errors import EngineManagerError

    deadline = time.monotonic() + 60
    while True:
        try:
            return factory(fleet_url=config.fleet_url)
        except EngineManagerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _traffic(manager: Any, spec: Any, kind: str, recorder: _Recorder, stop: Any) -> None:
    from sqlalchemy import text

    sql = text(SQL[kind])
    while not stop.is_set():
        began = time.monotonic()
        try:
            with manager.connect(spec) as connection:
                connection.execute(sql)
        except Exception as exc:  # every failure is recorded by class
            error = classify(exc)
            message = f"{type(exc).__name__}: {exc}"
            if error.startswith("defect:"):  # where it came from, for whoever fixes it
                message += "\n" + "".join(traceback.format_exception(exc)[-6:])
            recorder.record(kind, began, error, message)
            stop.wait(0.05)  # a failing kind does not spin
        else:
            recorder.record(kind, began)


class _Crash:
    """A message no actor expects: it raises in ``on_receive``, the supervisor restarts it."""


def crash_actors() -> list[str]:
    """Send :class:`_Crash` to this process's EngineRegistry and BudgetKeeper."""
    import pykka

    crashed = []
    for name in ("EngineRegistry", "BudgetKeeper"):
        for ref in pykka.ActorRegistry.get_by_class_name(name):
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(_Crash())
                crashed.append(name)
    return crashed


def _exhaust_fds(manager: Any, specs: dict[str, Any], seconds: float, recorder: _Recorder) -> None:
    """Lower RLIMIT_NOFILE, take every descriptor left, drop the pools; after ``seconds``, undo."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, used + 16), hard))
    held: list[int] = []
    disposed: list[str] = []
    try:
        _fill(held)
        for spec in specs.values():  # new connections are needed now, and none can be made
            with contextlib.suppress(Exception):
                manager.dispose(spec.id)
                disposed.append(str(spec.id))
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            _fill(held)  # take back what a closed connection freed
            time.sleep(0.01)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    recorder.write({"type": "fds", "held": len(held), "limit": used + 16, "disposed": disposed})


def _fill(held: list[int]) -> None:
    with contextlib.suppress(OSError):
        while True:
            held.append(os.open("/dev/null", os.O_RDONLY))


def _finish(
    manager: Any,
    specs: dict[str, Any],
    traffic: list[threading.Thread],
    recorder: _Recorder,
    config: WorkerConfig,
) -> None:
    """Stop traffic, check permits against connections, shut down, count what is left."""
    join_deadline = time.monotonic() + 60
    for thread in traffic:
        thread.join(timeout=max(0.1, join_deadline - time.monotonic()))
    recorder.flush()
    stuck = [t.name for t in traffic if t.is_alive()]
    permits = _permits_against_connections(manager, specs["pg"], config)
    began = time.monotonic()
    manager.shutdown()
    shutdown_s = time.monotonic() - began
    ours = {threading.current_thread(), *traffic}
    left = _settle(
        lambda: [
            t.name
            for t in threading.enumerate()
            if t not in ours and t.is_alive() and not t.name.startswith("soak-")
        ],
        15,
    )
    conns = _settle(lambda: _server_connections(config), 15)
    recorder.write(
        {
            "type": "finished",
            "stuck_traffic_threads": stuck,
            "threads_left": left,
            "server_connections_left": conns,
            "shutdown_s": shutdown_s,
            **permits,
        }
    )
    recorder.file.close()


def _permits_against_connections(manager: Any, spec: Any, config: WorkerConfig) -> dict[str, Any]:
    """Permits this process holds for ``spec`` (``stats()``) against its server connections.

    Traffic has stopped; connections still closing leave pg_stat_activity within moments, so
    both are read again until they agree (at most 10 s). The last difference is reported:
    > 0 a permit without a connection (a leak), < 0 a connection without a permit.
    """
    pattern = f"{config.run}:pg:{config.tag}"
    deadline = time.monotonic() + 10
    while True:
        try:
            stats = manager.stats()
        except Exception as exc:
            return {"stats_error": classify(exc)}
        held = sum(b.held for b in stats.budgets if b.key == f"db:{spec.id}")
        server = sum(_pg_counts(config.pg_uri, pattern).values())
        if held == server or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    budget = next((b.model_dump() for b in stats.budgets if b.key == f"db:{spec.id}"), None)
    return {
        "permits_held": held,
        "server_connections": server,
        "restarts": stats.restarts,
        "budget": budget,
    }


def _server_connections(config: WorkerConfig) -> list[str]:
    """This worker's PostgreSQL connections still on the server (by application_name)."""
    pattern = f"{config.run}:%:{config.tag}"
    return [name for name, n in _pg_counts(config.pg_uri, pattern).items() for _ in range(n)]


def _settle(probe: Callable[[], list[str]], seconds: float) -> list[str]:
    """``probe()`` until it answers nothing, at most ``seconds``; its last answer."""
    deadline = time.monotonic() + seconds
    found = probe()
    while found and time.monotonic() < deadline:
        time.sleep(0.1)
        found = probe()
    return found


def _capture_output(path: Path) -> None:
    """Point this process's stdout and stderr (fds 1 and 2) at ``path``: scanned for secrets."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _capture_logs(path: Path) -> None:
    """Every log record into ``path`` (DEBUG; SQLAlchemy's per-statement lines left out)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s %(process)d %(threadName)s %(name)s %(levelname)s %(message)s"
        )
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    logging.getLogger("sqlalchemy").setLevel(logging.INFO)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)


# -- the observer (raw SQLAlchemy, not enginehouse) ----------------------------------------


def _pg_counts(pg_uri: str, pattern: str) -> dict[str, int]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(pg_uri, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT application_name, count(*) FROM pg_stat_activity "
                    "WHERE application_name LIKE :p GROUP BY 1"
                ),
                {"p": pattern},
            ).fetchall()
    finally:
        engine.dispose()
    return {str(name): int(n) for name, n in rows}


class Observer:
    """Samples the run's server connections per kind; terminates them on demand."""

    def __init__(self, pg_uri: str, run: str, every: float = 0.05) -> None:
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        self.run = run
        self.every = every
        self.points: list[tuple[float, dict[str, int]]] = []
        self._text = text
        # Autocommit: pg_stat_activity is a snapshot taken once per transaction.
        self._engine = create_engine(pg_uri, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="soak-observer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=20)
        self._engine.dispose()

    def counts(self, connection: Any) -> dict[str, int]:
        rows = connection.execute(
            self._text(
                "SELECT split_part(application_name, ':', 2), count(*) FROM pg_stat_activity "
                "WHERE application_name LIKE :p GROUP BY 1"
            ),
            {"p": f"{self.run}:%"},
        ).fetchall()
        return {str(kind): int(n) for kind, n in rows}

    def terminate(self) -> int:
        with self._engine.connect() as connection:
            rows = connection.execute(
                self._text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name LIKE :p"
                ),
                {"p": f"{self.run}:%"},
            ).fetchall()
        return len(rows)

    def peak(self, kind: str, start: float = float("-inf"), end: float = float("inf")) -> int:
        return max((c.get(kind, 0) for t, c in self.points if start <= t <= end), default=0)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                with self._engine.connect() as connection:
                    while not self._stop.is_set():
                        self.points.append((time.monotonic(), self.counts(connection)))
                        self._stop.wait(self.every)
            except Exception:  # PostgreSQL hiccup: reconnect
                self._stop.wait(0.2)


# -- the orchestrator -----------------------------------------------------------------------


@dataclass
class Window:
    fault: Fault
    start: float
    end: float
    detail: dict[str, Any] = field(default_factory=dict)


class Soak:
    """Services, workers, the fault schedule and the final checks of one run."""

    def __init__(self, schedule: Schedule, workdir: Path) -> None:
        from sshd_fixtures import KEY_PASSPHRASE, USER, start_sshd

        self.schedule = schedule
        self.workdir = workdir
        self.run = f"soak{uuid.uuid4().hex[:8]}"
        self.pg_uri = _pg_uri()
        self.redis = SoakRedis(workdir)
        self.redis.start()
        self.sshd = start_sshd()
        self.relay = BlackholeRelay(self.sshd.port)
        self.ssh_user = USER
        self.ssh_key = self.sshd.keys["ed25519_passphrase"]
        self.ssh_key_passphrase = KEY_PASSPHRASE
        self.secrets = [PG_PASSWORD, REDIS_PASSWORD, KEY_PASSPHRASE, *_key_lines(self.ssh_key)]
        self.observer = Observer(self.pg_uri, self.run)
        self.context = multiprocessing.get_context("spawn")
        self.go = self.context.Event()
        self.stop = self.context.Event()
        self.t0 = self.context.Value("d", 0.0)
        self.workers: dict[int, Any] = {}
        self.generations: dict[int, int] = {}
        self.killed_pids: list[int] = []
        self.windows: list[Window] = []

    # -- workers

    def config(self, index: int) -> WorkerConfig:
        generation = self.generations.get(index, 0)
        fd_seconds = next(
            (f.seconds for f in self.schedule.faults if f.name == "fd_exhaustion"), 0.0
        )
        return WorkerConfig(
            index=index,
            generation=generation,
            run=self.run,
            logdir=str(self.workdir),
            threads=dict(self.schedule.threads),
            fleet_url=self.redis.url,
            pg_uri=self.pg_uri,
            mysql_uri=MYSQL_URI,
            relay_port=self.relay.port,
            ssh_user=self.ssh_user,
            ssh_key=self.ssh_key,
            ssh_key_passphrase=self.ssh_key_passphrase,
            fd_seconds=fd_seconds,
        )

    def spawn(self, index: int) -> None:
        process = self.context.Process(
            target=worker_main,
            args=(self.config(index), self.go, self.t0, self.stop),
            name=f"soak-worker-{index}",
        )
        process.start()
        self.workers[index] = process

    def start(self) -> None:
        for index in range(self.schedule.processes):
            self.spawn(index)
        # Ready once their managers exist (imports take seconds on a loaded machine).
        _poll(self._all_ready, 180, "workers to start")
        self.observer.start()
        self.t0.value = time.monotonic() + 1.0
        self.go.set()

    def _all_ready(self) -> bool:
        dead = [i for i, p in self.workers.items() if p.exitcode is not None]
        if dead:
            raise RuntimeError(f"worker(s) {dead} exited before the start; logs in {self.workdir}")
        return all((self.workdir / f"ready-w{i}.0").exists() for i in self.workers)

    def since_start(self) -> float:
        return time.monotonic() - self.t0.value

    # -- faults

    def inject(self) -> None:
        for fault in sorted(self.schedule.faults, key=lambda f: f.at):
            self._sleep_until(fault.at)
            start = self.since_start()
            detail = getattr(self, f"_fault_{fault.name}")(fault) or {}
            self.windows.append(Window(fault, start, self.since_start(), detail))
            print(f"  {start:6.1f}s  {fault.name}  {detail}", flush=True)
        self._sleep_until(self.schedule.duration)

    def _sleep_until(self, at: float) -> None:
        time.sleep(max(0.0, at - self.since_start()))

    def _hold(self, fault: Fault) -> None:
        time.sleep(max(0.0, fault.seconds))

    def _fault_pg_terminate(self, fault: Fault) -> dict[str, Any]:
        return {"terminated": self.observer.terminate()}

    def _fault_redis_kill(self, fault: Fault) -> dict[str, Any]:
        self.redis.kill()
        self._hold(fault)
        self.redis.start()
        return {}

    def _fault_redis_oom(self, fault: Fault) -> dict[str, Any]:
        client = self.redis.client()
        try:
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", 1)
            self._hold(fault)
            client.config_set("maxmemory", 0)
        finally:
            client.close()
        return {}

    def _fault_redis_stall(self, fault: Fault) -> dict[str, Any]:
        client = self.redis.client(timeout=fault.seconds + 10)
        try:
            client.execute_command("DEBUG", "SLEEP", fault.seconds)
        finally:
            client.close()
        return {}

    def _fault_ssh_sessions_killed(self, fault: Fault) -> dict[str, Any]:
        return {"sessions": self.sshd.kill_sessions()}

    def _fault_bastion_blackhole(self, fault: Fault) -> dict[str, Any]:
        self.relay.blackhole()
        self._hold(fault)
        self.relay.heal()
        return {}

    def _fault_actor_crash(self, fault: Fault) -> dict[str, Any]:
        for process in self.workers.values():
            if process.pid is not None:
                os.kill(process.pid, signal.SIGUSR1)
        return {"processes": len(self.workers)}

    def _fault_worker_sigkill(self, fault: Fault) -> dict[str, Any]:
        index = fault.worker or 0
        process = self.workers[index]
        self.killed_pids.append(process.pid)
        process.kill()
        process.join(timeout=20)
        self.generations[index] = self.generations.get(index, 0) + 1
        self.spawn(index)
        return {"worker": index, "pid": self.killed_pids[-1]}

    def _fault_fd_exhaustion(self, fault: Fault) -> dict[str, Any]:
        index = fault.worker if fault.worker is not None else 0
        os.kill(self.workers[index].pid, signal.SIGUSR2)
        self._hold(fault)
        return {"worker": index}

    # -- the end

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        hung = []
        for index, process in self.workers.items():
            process.join(timeout=120)
            if process.is_alive():
                hung.append(index)
                process.kill()
                process.join(timeout=20)
        self.observer.stop()
        after = {
            "hung_workers": hung,
            "exit_codes": {i: p.exitcode for i, p in self.workers.items()},
            "redis_permits": self.redis.permits() if self.redis.answers() else None,
        }
        return after

    def close(self) -> None:
        import sshd_fixtures

        self.stop.set()
        for process in self.workers.values():
            if process.is_alive():
                process.kill()
        self.relay.close()
        sshd_fixtures.remove_sshd(self.sshd)
        # Workers pinned the relay's port (pin-first): a later server on it has another key.
        forget = getattr(sshd_fixtures, "forget_pins", None)  # once pins live in a file
        if forget is not None:
            forget(self.relay.port)
        self.redis.kill()


# -- the report -----------------------------------------------------------------------------


def read_records(workdir: Path) -> list[dict[str, Any]]:
    """Every JSON line the workers wrote (a SIGKILLed one may have left half a line)."""
    records = []
    for path in sorted(workdir.glob("worker-*.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def report(soak: Soak, after: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    schedule = soak.schedule
    outcomes = [r for r in records if r["type"] == "outcomes"]
    ok = {kind: sum(sum(r["ok"].get(kind, {}).values()) for r in outcomes) for kind in KINDS}
    failed: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
    samples: dict[str, str] = {}
    for r in outcomes:
        for kind, by_class in r["failed"].items():
            failed[kind].update(by_class)
        for error, message in r["samples"].items():
            samples.setdefault(error, message)
    finished = [r for r in records if r["type"] == "finished"]
    killed = {str(pid) for pid in soak.killed_pids}
    permits = after["redis_permits"] or {}
    of_killed = {p: n for p, n in permits.items() if p.rsplit(":", 2)[-2] in killed}
    leftover = {p: n for p, n in permits.items() if p not in of_killed}
    defects = {
        f"{k} {error}": {"count": n, "sample": samples.get(f"{k} {error}", "")}
        for k in KINDS
        for error, n in sorted(failed[k].items())
        if error.startswith("defect:")
    }
    windows = [_window_report(w, outcomes, soak) for w in soak.windows]
    secrets = scan_secrets(soak.workdir, soak.secrets, samples)
    cap_peak = soak.observer.peak("pg")
    return {
        "benchmark": "soak",
        "when": utc_now(),
        "machine": machine_info(),
        "schedule": {
            "duration": schedule.duration,
            "processes": schedule.processes,
            "threads": schedule.threads,
            "faults": [asdict(f) for f in schedule.faults],
        },
        "settings": "EngineManager defaults + fleet_url (private Redis)",
        "cap": CAP,
        "queries_ok": ok,
        "queries_failed": {kind: dict(failed[kind]) for kind in KINDS},
        "error_samples": samples,
        "defects": defects,
        "peak_server_connections": {kind: soak.observer.peak(kind) for kind in ("pg", "ssh")},
        "cap_exceeded": cap_peak > CAP,
        "cap_peaks_by_fault": {w["fault"]: w["peak_pg"] for w in windows},
        "permits_outstanding": {
            "live_processes": sum(leftover.values()),
            "sigkilled_processes": sum(of_killed.values()),
            "by_process": permits,
        },
        "permits_without_connection": {
            f"w{r['worker']}.{r['generation']}": r.get("permits_held", 0)
            - r.get("server_connections", 0)
            for r in finished
            if "permits_held" in r
        },
        "threads_left": {f"w{r['worker']}.{r['generation']}": r["threads_left"] for r in finished},
        "server_connections_left": {
            f"w{r['worker']}.{r['generation']}": r["server_connections_left"] for r in finished
        },
        "stuck_traffic_threads": {
            f"w{r['worker']}.{r['generation']}": r["stuck_traffic_threads"]
            for r in finished
            if r["stuck_traffic_threads"]
        },
        "shutdown_s": {f"w{r['worker']}.{r['generation']}": r["shutdown_s"] for r in finished},
        "longest_call_s": {
            kind: max(
                (sec for r in outcomes for k, _, sec in r.get("slow", []) if k == kind), default=0.0
            )
            for kind in KINDS
        },
        "workers_finished": len(finished),
        "workers_expected": schedule.processes,
        "secrets_found": secrets,
        "faults": windows,
        "after": after,
        "timeline": timeline(outcomes, schedule.duration),
        "connections": [(round(t - soak.t0.value, 2), c) for t, c in soak.observer.points],
        "extra_records": [r for r in records if r["type"] in ("crashed", "fds", "started")],
    }


def _window_report(window: Window, outcomes: list[dict[str, Any]], soak: Soak) -> dict[str, Any]:
    """Per kind: recovery (first success after the fault ended), failures and the longest call
    from the fault's start to that recovery. A fault aimed at one worker counts its traffic only
    (after a SIGKILL, its replacement's)."""
    fault = window.fault
    mine = [r for r in outcomes if fault.worker is None or r["worker"] == fault.worker]
    if fault.name == "worker_sigkill":
        mine = [r for r in mine if r["generation"] >= 1]
    recovery: dict[str, float | None] = {}
    failed: dict[str, int] = {}
    longest: dict[str, float] = {}
    for kind in KINDS:
        oks = sorted(int(b) for r in mine for b, n in r["ok"].get(kind, {}).items() if n)
        later = [b for b in oks if b >= int(window.end / BUCKET)]
        back = round(max(0.0, later[0] * BUCKET - window.end), 2) if later else None
        recovery[kind] = back
        until = window.end + (back if back is not None else float("inf"))
        failed[kind] = sum(
            n
            for r in mine
            for b, n in r["failed_at"].get(kind, {}).items()
            if window.start <= int(b) * BUCKET <= until + BUCKET
        )
        longest[kind] = max(
            (
                seconds
                for r in mine
                for k, began, seconds in r.get("slow", [])
                if k == kind and began <= until and began + seconds >= window.start
            ),
            default=0.0,
        )
    t0 = soak.t0.value
    return {
        "fault": fault.name,
        "what": fault.what,
        "worker": fault.worker,
        "start": round(window.start, 2),
        "end": round(window.end, 2),
        "detail": window.detail,
        "recovery_s": recovery,
        "failed_until_recovery": failed,
        "longest_call_s": longest,
        "peak_pg": soak.observer.peak("pg", t0 + window.start, t0 + window.end + 5),
    }


def timeline(
    outcomes: list[dict[str, Any]], duration: float, step: float = 1.0
) -> dict[str, list[float]]:
    """Queries/s per kind in ``step``-second bins over the run."""
    bins = int(duration / step) + 1
    series = {kind: [0.0] * bins for kind in KINDS}
    for r in outcomes:
        for kind, buckets in r["ok"].items():
            for bucket, n in buckets.items():
                index = int(int(bucket) * BUCKET / step)
                if 0 <= index < bins:
                    series[kind][index] += n / step
    return series


def scan_secrets(workdir: Path, secrets: Sequence[str], samples: dict[str, str]) -> dict[str, Any]:
    """Known secrets in every captured log and output file and in the error samples."""
    found: dict[str, int] = {}
    scanned = 0
    texts = {p.name: p.read_text(errors="replace") for p in sorted(workdir.glob("worker-*"))}
    texts["error_samples"] = json.dumps(samples)
    for name, text in texts.items():
        scanned += len(text)
        hits = [index for index, secret in enumerate(secrets) if secret in text]
        if hits:
            found[name] = len(hits)
    return {
        "files": len(texts),
        "bytes": scanned,
        "secrets": len(secrets),
        "found": found,
        "count": sum(found.values()),
    }


def _key_lines(key: str) -> list[str]:
    return [line for line in key.splitlines() if len(line) >= 20 and "--" not in line]


def summary_table(data: dict[str, Any]) -> str:
    lines = ["| kind | ok | failed (ours) | failed (database) | defects |", "|---|---|---|---|---|"]
    for kind in KINDS:
        failed = data["queries_failed"][kind]
        by = {
            p: sum(n for e, n in failed.items() if e.startswith(p))
            for p in ("ours:", "database:", "defect:")
        }
        lines.append(
            f"| {kind} | {data['queries_ok'][kind]:,} | {by['ours:']:,} | "
            f"{by['database:']:,} | {by['defect:']:,} |"
        )
    lines += [
        "",
        "| fault | at s | lasted s | recovery pg / mysql / ssh s | failed until then "
        "| longest call s | peak pg conns |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in data["faults"]:
        rec = " / ".join(
            "-" if w["recovery_s"][k] is None else f"{w['recovery_s'][k]:.1f}" for k in KINDS
        )
        lasted = w["end"] - w["start"]
        failed = " / ".join(str(w["failed_until_recovery"][k]) for k in KINDS)
        longest = " / ".join(f"{w['longest_call_s'][k]:.1f}" for k in KINDS)
        lines.append(
            f"| {w['fault']} | {w['start']:.1f} | {lasted:.1f} | {rec} | {failed} | {longest} "
            f"| {w['peak_pg']} |"
        )
    permits = data["permits_outstanding"]
    peaks = data["peak_server_connections"]
    scan = data["secrets_found"]
    threads = sum(len(v) for v in data["threads_left"].values())
    conns = sum(len(v) for v in data["server_connections_left"].values())
    lines += [
        "",
        f"peak server connections: pg {peaks['pg']} (cap {data['cap']}), ssh {peaks['ssh']}",
        "longest call (connect + query), s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in data["longest_call_s"].items()),
        f"permits outstanding in Redis after the run: {permits['live_processes']} "
        f"(+{permits['sigkilled_processes']} of SIGKILLed processes, until their lease expires)",
        f"permits minus server connections (stats() vs pg_stat_activity): "
        f"{data['permits_without_connection']}",
        f"threads left after shutdown: {threads}; server connections left: {conns}; "
        f"workers finished {data['workers_finished']}/{data['workers_expected']}",
        f"secrets found in logs: {scan['count']} "
        f"({scan['files']} files, {scan['bytes']:,} bytes scanned)",
    ]
    for error, d in data["defects"].items():
        lines.append(f"DEFECT {error} x{d['count']}: {d['sample']}")
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> Path:
    """Queries/s of each kind over time, a panel each, and the capped database's server
    connections against the cap; fault windows shaded, instant faults dashed."""
    import matplotlib.pyplot as plt

    labels = {
        "pg": f"PostgreSQL direct (fleet cap {data['cap']}): queries/s",
        "mysql": "MariaDB: queries/s",
        "ssh": "PostgreSQL through sshd: queries/s",
    }
    fig, axes = plt.subplots(len(KINDS) + 1, 1, figsize=(11, 8.5), sharex=True)
    for ax, kind, color in zip(axes, KINDS, ("tab:blue", "tab:orange", "tab:green"), strict=False):
        series = data["timeline"][kind]
        ax.plot(range(len(series)), series, color=color, linewidth=1.2)
        ax.set_ylim(0, (max(series, default=1.0) or 1.0) * 1.25)
        _panel(ax, labels[kind], data["faults"])
    conns = axes[-1]
    times = [t for t, _ in data["connections"]]
    conns.step(
        times,
        [c.get("pg", 0) for _, c in data["connections"]],
        where="post",
        color="tab:blue",
        linewidth=1,
    )
    conns.axhline(data["cap"], color="black", linestyle=":", linewidth=1)
    conns.set_ylim(0, data["cap"] * 1.6)
    _panel(
        conns,
        "PostgreSQL direct: server connections (pg_stat_activity), cap dotted",
        data["faults"],
    )
    for index, w in enumerate(data["faults"]):
        axes[0].annotate(
            w["fault"].replace("_", " "),
            (w["start"], 1.04 + 0.16 * (index % 3)),
            xycoords=("data", "axes fraction"),
            fontsize=8,
            color="darkred",
            annotation_clip=False,
        )
    axes[-1].set_xlim(0, data["schedule"]["duration"])
    axes[-1].set_xlabel(
        "seconds since traffic started (shaded: fault windows; dashed: instant faults)"
    )
    fig.suptitle(
        f"Fault-injection soak, {data['when']}: {data['schedule']['processes']} processes, "
        "all workers summed; EngineManager defaults + fleet_url",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panel(ax: Any, label: str, faults: list[dict[str, Any]]) -> None:
    ax.text(
        0.005,
        0.97,
        label,
        transform=ax.transAxes,
        fontsize=9,
        va="top",
        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
    )
    ax.grid(alpha=0.3)
    for w in faults:
        if w["end"] - w["start"] >= 0.5:
            ax.axvspan(w["start"], w["end"], color="tab:red", alpha=0.15)
        else:
            ax.axvline(w["start"], color="tab:red", alpha=0.7, linestyle="--", linewidth=1)


# -- helpers and main -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _poll(predicate: Callable[[], object], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {seconds:g}s waiting for {what}")
        time.sleep(0.05)


def run(schedule: Schedule, workdir: Path) -> dict[str, Any]:
    """One soak: services up, workers, faults, checks; every service stopped at the end."""
    soak = Soak(schedule, workdir)
    try:
        soak.start()
        soak.inject()
        after = soak.finish()
        return report(soak, after, read_records(workdir))
    finally:
        soak.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--short", action="store_true", help="~40 s, 2 processes (the test suite's run)"
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=PLOTS_DIR / "soak.png",
        help="where the full run's plot goes (short runs plot only if given)",
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--keep-logs", action="store_true", help="keep the captured logs' folder")
    parser.add_argument("--replot", type=Path, help="plot again from a results file, run nothing")
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.plot)
        return 0
    schedule = SHORT if args.short else FULL
    workdir = Path(tempfile.mkdtemp(prefix="enginehouse-soak-"))
    try:
        data = run(schedule, workdir)
    finally:
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    data["short"] = args.short
    path = write_results("soak-short" if args.short else "soak", data)
    print(summary_table(data))
    print(f"results: {path}" + (f"; logs kept in {workdir}" if args.keep_logs else ""))
    explicit = "--plot" in (argv if argv is not None else sys.argv)
    if not args.no_plot and (not args.short or explicit):
        if plotting_available():
            print(f"plot: {plot(data, args.plot)}")
        else:
            print("plot skipped: matplotlib is not installed (pip install --group bench)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
