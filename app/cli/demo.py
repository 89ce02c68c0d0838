"""``python -m enginehouse demo``: many databases, sources and users on embedded SQLite.

Shows, with no server: one cached engine per database however many threads
and users hit it, single-flight creation under a burst, the cost of NEW
mode, clear errors for bad input, and a clean shutdown.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import text

from enginehouse.errors import EngineManagerError
from enginehouse.manager import EngineManager
from enginehouse.settings import ManagerSettings
from enginehouse.specs import DatabaseSpec

SOURCES = ("dashboard", "chart", "sql_lab")
USERS = ("alice", "bob", "carol", "dave")


def run_demo(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns a process exit code."""
    args = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="enginehouse-demo-") as folder:
        databases = _make_databases(Path(folder), args.databases)
        print(f"{args.databases} SQLite databases in {folder}, {args.threads} threads\n")
        singleton = _workload("singleton", databases, args.threads, args.queries)
        new = _workload("new", databases, args.threads, args.queries)
        print(f"\nSINGLETON served {singleton / new:.1f}x the queries per second of NEW.\n")
        _burst(databases[0])
        _bad_input(databases[0])
    print("\nAll managers shut down; no actor thread left:", _actor_threads() == [])
    return 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="enginehouse demo", description=__doc__)
    parser.add_argument("--databases", type=int, default=12, help="how many SQLite databases")
    parser.add_argument("--threads", type=int, default=16, help="concurrent worker threads")
    parser.add_argument("--queries", type=int, default=200, help="queries per thread")
    return parser.parse_args(argv)


def _settings(**values: Any) -> dict[str, Any]:
    # SQLite files are refused on servers by default; the embedded demo opts in.
    if "forbid_unsafe_uris" in ManagerSettings.model_fields:
        values["forbid_unsafe_uris"] = False
    return values


def _make_databases(folder: Path, count: int) -> list[DatabaseSpec]:
    specs = []
    for number in range(1, count + 1):
        path = folder / f"warehouse_{number}.db"
        with sqlite3.connect(path) as raw:
            raw.execute("CREATE TABLE sales (region TEXT, amount INTEGER)")
            raw.executemany(
                "INSERT INTO sales VALUES (?, ?)",
                [(random.choice("NSEW"), random.randint(1, 100)) for _ in range(100)],
            )
        extra = {"engine_params": {"pool_size": 4, "max_overflow": 8}}
        specs.append(DatabaseSpec(id=number, uri=f"sqlite:///{path}", extra=extra))
    return specs


def _workload(mode: str, databases: list[DatabaseSpec], threads: int, queries: int) -> float:
    errors: list[BaseException] = []
    with EngineManager(**_settings(mode=mode)) as manager:

        def worker() -> None:
            try:
                for _ in range(queries):
                    database = random.choice(databases)
                    source, user = random.choice(SOURCES), random.choice(USERS)
                    with manager.connect(database, source=source, user=user) as conn:
                        conn.execute(text("SELECT sum(amount) FROM sales")).scalar_one()
            except BaseException as exc:
                errors.append(exc)

        started = time.perf_counter()
        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        elapsed = time.perf_counter() - started
        stats = manager.stats()
    total = threads * queries
    print(f"{mode.upper():9} {total} queries in {elapsed:.2f}s ({total / elapsed:,.0f} q/s), "
          f"errors: {len(errors)}")
    if mode == "singleton":
        print(f"          engines cached: {stats.engine_count} (one per database, shared by "
              f"{len(USERS)} users and {len(SOURCES)} sources), hits {stats.hits}, "
              f"misses {stats.misses}")
        for pool_stats in stats.engines[:3]:
            print(f"          db {pool_stats.database_id}: {pool_stats.pool_class} "
                  f"size={pool_stats.size} checked_in={pool_stats.checked_in} "
                  f"hits={pool_stats.hits}")
    else:
        print(f"          engines created and disposed: {stats.uncached_created}")
    return total / elapsed


def _burst(database: DatabaseSpec) -> None:
    fresh = DatabaseSpec(id=999, uri=database.uri)
    barrier = threading.Barrier(32)
    seen: list[int] = []
    with EngineManager(**_settings()) as manager:

        def first_use() -> None:
            barrier.wait()
            seen.append(id(manager.get(fresh)))

        pool = [threading.Thread(target=first_use) for _ in range(32)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        created = manager.stats().created
    print(f"32 threads asked for one new database at once: {len(set(seen))} engine object, "
          f"{created} created (single-flight, no lock)")


def _bad_input(database: DatabaseSpec) -> None:
    print("\nBad input gets a clear error and the manager keeps serving:")
    with EngineManager(**_settings()) as manager:
        attempts = [
            ("schema on SQLite", lambda: manager.get(database, schema="sales")),
            ("unknown pool class", lambda: DatabaseSpec(
                id=7, uri="sqlite://", extra={"engine_params": {"poolclass": "lake"}})),
            ("extra not an object", lambda: DatabaseSpec.model_validate(
                {"id": 7, "uri": "sqlite://", "extra": "[1, 2]"})),
            ("malformed URI", lambda: DatabaseSpec(id=7, uri="not a url")),
            ("driver missing", lambda: manager.get(DatabaseSpec(
                id=8, uri="postgresql+pg8000://demo:hunter2@localhost/x"))),
        ]
        for label, attempt in attempts:
            try:
                attempt()
                print(f"  {label:20} -> no error?")
            except EngineManagerError as exc:
                print(f"  {label:20} -> {type(exc).__name__}: {exc}")
        with manager.connect(database) as conn:
            total = conn.execute(text("SELECT count(*) FROM sales")).scalar_one()
        print(f"  {'still serving':20} -> {total} rows")


def _actor_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("Supervisor", "Engine",
                                                                        "Janitor"))]
