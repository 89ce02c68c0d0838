"""Embedded and fleet budgets inside one process: what a permit costs, what sharing costs.

    python -m benchmarks.bench_budget            # full run (~1 min)
    python -m benchmarks.bench_budget --quick    # smoke run (~15 s)

1. **Permit cost per physical connection.** One thread opens and closes
   physical PostgreSQL connections (checkout, ``SELECT 1``, invalidate, so
   the next checkout connects again) through raw SQLAlchemy, through an
   enginehouse engine under an embedded budget, and under a fleet budget in
   Redis; interleaved rounds, medians and ratios of the same run.
2. **Two managers in one process.** Two EngineManagers (say a Flask
   extension's and the default ``engines``), 4 threads each, ``SELECT 1``
   on one database with ``max_connections=4``: sharing the process's cap
   (same ``fleet_prefix``) against each manager keeping its own cap
   (different prefixes: up to 8 connections, what enginehouse did before
   budgets became per process) and against no cap. A sampler counts the
   connections in ``pg_stat_activity`` throughout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text

if not __package__:  # run as a script (python benchmarks/bench_budget.py): find the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    PG_DSN,
    PG_URI,
    ConnectionSampler,
    interleave,
    machine_info,
    utc_now,
    write_results,
)
from enginehouse import DatabaseSpec, EngineManager
from enginehouse.budget_client import close_and_wait

REDIS = os.environ.get("ENGINEHOUSE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
CAP = 4
THREADS = 4


def spec(app: str, cap: int | None) -> DatabaseSpec:
    extra: dict[str, Any] = {"engine_params": {"connect_args": {"application_name": app}}}
    if cap is not None:
        extra["max_connections"] = cap
    return DatabaseSpec(id=f"bench-{app}", uri=PG_URI, extra=extra)


def physical(engine: Any) -> Callable[[], object]:
    """One physical connection: connect, SELECT 1, close it for good."""

    def once() -> object:
        connection = engine.connect()
        connection.execute(text("SELECT 1")).scalar()
        connection.invalidate()  # the pool drops it: the next checkout connects again
        connection.close()
        return None

    return once


def permit_cost(rounds: int, batch: int) -> dict[str, Any]:
    prefix = f"eh-bench-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        embedded = stack.enter_context(EngineManager())
        fleet = stack.enter_context(
            EngineManager(fleet_url=REDIS, fleet_prefix=prefix)
        )
        raw = create_engine(PG_URI)
        stack.callback(raw.dispose)
        waiting = create_engine(PG_URI)  # what "closing means gone" costs on its own
        event.listen(waiting.pool, "close", lambda dbapi, _record: close_and_wait(dbapi))
        stack.callback(waiting.dispose)
        samples = interleave(
            {
                "raw SQLAlchemy": physical(raw),
                "raw, waiting for the server to drop each": physical(waiting),
                "embedded budget": physical(embedded.get(spec("permit-e", CAP))),
                "fleet budget (Redis)": physical(fleet.get(spec("permit-f", CAP))),
            },
            rounds=rounds,
            batch=batch,
        )
    base = statistics.median(samples["raw SQLAlchemy"])
    return {
        "samples": samples,
        "median_s": {name: statistics.median(v) for name, v in samples.items()},
        "vs_raw": {name: statistics.median(v) / base for name, v in samples.items()},
    }


def two_managers(case: str, seconds: float) -> dict[str, Any]:
    """Both managers' threads run SELECT 1 for ``seconds``: queries per second, peak."""
    app = f"eh-two-{uuid.uuid4().hex[:8]}"
    cap = None if case == "uncapped" else CAP
    prefixes = ("a", "b") if case == "a cap per manager" else ("shared", "shared")
    database = spec(app, cap)
    counts = [0, 0]
    errors = [0]
    with ExitStack() as stack:
        managers = [
            stack.enter_context(
                EngineManager(fleet_prefix=f"eh-bench-{p}-{app}")
            )
            for p in prefixes
        ]
        for manager in managers:  # build the engines before the clock starts
            with manager.connect(database) as connection:
                connection.execute(text("SELECT 1"))
        start = time.monotonic() + 0.2
        end = start + seconds

        def work(side: int) -> None:
            engine = managers[side].get(database)
            while time.monotonic() < start:
                time.sleep(0.001)
            while time.monotonic() < end:
                try:
                    with engine.connect() as connection:
                        connection.execute(text("SELECT 1"))
                    counts[side] += 1
                except Exception:
                    errors[0] += 1

        threads = [threading.Thread(target=work, args=(i % 2,)) for i in range(2 * THREADS)]
        with ConnectionSampler(app, PG_DSN) as sampler:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    return {
        "case": case,
        "qps": sum(counts) / seconds,
        "per_manager_qps": [c / seconds for c in counts],
        "peak": sampler.peak,
        "errors": errors[0],
    }


CASES = ("shared process cap", "a cap per manager", "uncapped")


def sharing(repeats: int, seconds: float) -> dict[str, Any]:
    runs = [two_managers(case, seconds) for _ in range(repeats) for case in CASES]
    median = {c: statistics.median(r["qps"] for r in runs if r["case"] == c) for c in CASES}
    return {
        "runs": runs,
        "median_qps": median,
        "peak": {c: max(r["peak"] for r in runs if r["case"] == c) for c in CASES},
        "errors": sum(r["errors"] for r in runs),
        "shared / per manager": median[CASES[0]] / median[CASES[1]],
        "shared / uncapped": median[CASES[0]] / median[CASES[2]],
    }


def report(cost: dict[str, Any], share: dict[str, Any]) -> str:
    lines = [
        "| per physical connection (connect, SELECT 1, close) | median | vs raw SQLAlchemy |",
        "| --- | ---: | ---: |",
    ]
    for name, value in cost["median_s"].items():
        lines.append(f"| {name} | {value * 1e3:.2f} ms | {cost['vs_raw'][name]:.2f}x |")
    lines += [
        "",
        f"| two managers x {THREADS} threads, SELECT 1 | q/s (median) | peak connections |",
        "| --- | ---: | ---: |",
    ]
    for case in CASES:
        cap = "none" if case == "uncapped" else str(CAP)
        lines.append(
            f"| {case} (cap {cap}) | {share['median_qps'][case]:,.0f} | {share['peak'][case]} |"
        )
    lines += [
        "",
        f"- shared process cap / a cap per manager: {share['shared / per manager']:.2f}x "
        f"throughput; shared / uncapped: {share['shared / uncapped']:.2f}x",
        f"- failed queries: {share['errors']}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter phases")
    args = parser.parse_args()
    print(f"bench_budget: {utc_now()}", flush=True)
    cost = permit_cost(rounds=5 if args.quick else 15, batch=10 if args.quick else 20)
    share = sharing(repeats=1 if args.quick else 3, seconds=1.0 if args.quick else 3.0)
    print(report(cost, share))
    path = write_results(
        "budget", {"machine": machine_info(), "when": utc_now(), "cost": cost, "sharing": share}
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
