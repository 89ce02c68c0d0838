"""Fleet budgets (issues 5, 14): fleet mode vs PgBouncer vs uncapped QueuePool, one run.

    python -m benchmarks.bench_fleet            # full run (~5 min), plot into docs/img/
    python -m benchmarks.bench_fleet --quick    # smoke run (~1 min), prints only

The library runs on its DEFAULT settings (``cleanup_interval`` 30 s,
``fleet_lease_ttl`` 90 s, ``ask_timeout`` 10 s, ``pool_timeout`` 30 s); the only
settings given are ``fleet_url`` and a ``fleet_prefix`` of the run's own (so
that runs do not share budgets). Same load for every alternative: 4 worker
processes x 8 threads (tests/fleet_worker.py), one database with
``extra.max_connections = 8`` (fleet only) and ``engine_params.pool_size = 8``
(all), and these traffic shapes, each for a few seconds:

- ``SELECT 1`` and ``SELECT pg_sleep(0.005)``, all processes starting together;
- the same, with staggered process starts (process i starts i x 1 s late);
- rising demand: ``SELECT 1``, each process starting its threads one by one
  (0.4 s apart), the processes 0.25 s apart.

Same cap: fleet mode leases 8 connections in Redis; PgBouncer (transaction
mode, ``default_pool_size = 8``, installed by scripts/install-pgbouncer.sh when
missing) keeps 8 server connections; the uncapped QueuePool opens what its
4 x 8 threads want. Alternatives run interleaved, repeated; medians and ratios
of the same run are reported. A sampler counts the fleet's connections in
pg_stat_activity throughout (the cap must never be exceeded); every worker
reports its Redis round trips, physical connections, queries and the longest
wait for a connection (no process may starve longer than one pool_timeout).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PLOTS_DIR,
    ROOT,
    ConnectionSampler,
    machine_info,
    plotting_available,
    utc_now,
    write_results,
)

sys.path.insert(0, str(ROOT / "tests"))
from fleet_fixtures import (
    PG_DSN,
    PG_URI,
    SHARED_REDIS,
    start_worker,
    worker_result,
)
from pgbouncer_fixtures import PgBouncer

CAP = 8
POOL_SIZE = 8
PROCESSES = 4
THREADS = 8
STAGGER = 1.0  # s between process starts in the staggered phases
RAMP = 0.4  # s between thread starts in the rising-demand phase
POOL_TIMEOUT = 30.0  # SQLAlchemy's default, which the library keeps
SELECT_1, SLEEP = "SELECT 1", "SELECT pg_sleep(0.005)"
WORKLOADS = {  # name -> (sql, delay of process i, ramp between its threads)
    "SELECT 1": (SELECT_1, 0.0, 0.0),
    "pg_sleep 5 ms": (SLEEP, 0.0, 0.0),
    "SELECT 1, staggered starts": (SELECT_1, STAGGER, 0.0),
    "pg_sleep 5 ms, staggered starts": (SLEEP, STAGGER, 0.0),
    "SELECT 1, rising demand": (SELECT_1, 0.25, RAMP),
}
FLEET, BOUNCER, UNCAPPED = "fleet mode (cap 8)", "PgBouncer (8 server conns)", "QueuePool uncapped"


def _seconds(workload: str, seconds: float) -> float:
    """A phase's length: staggered and ramped phases last longer, so that the last process
    (and its last thread) runs about ``seconds`` too."""
    _, delay, ramp = WORKLOADS[workload]
    return seconds + delay * (PROCESSES - 1) + ramp * (THREADS - 1)


def _config(
    alternative: str, app: str, bouncer: PgBouncer, seconds: float, index: int
) -> dict[str, Any]:
    # Measurement, not tuning: application_name lets the sampler count our connections.
    engine_params: dict[str, Any] = {
        "connect_args": {"application_name": app}, "pool_size": POOL_SIZE,
    }
    extra: dict[str, Any] = {"engine_params": engine_params}
    settings: dict[str, Any] = {}  # the library's defaults
    uri = PG_URI
    if alternative == FLEET:
        extra["max_connections"] = CAP
        # A prefix of this run's own: earlier runs' budgets must not count.
        settings.update(fleet_url=SHARED_REDIS, fleet_prefix=app)
    elif alternative == BOUNCER:
        uri = bouncer.uri
        # Needed for correctness, not speed: transaction pooling cannot keep prepared statements.
        engine_params["connect_args"]["prepare_threshold"] = None
    return {
        "action": "phases",
        "threads": THREADS,
        "spec": {"id": f"bench-{alternative[:5]}", "uri": uri, "extra": extra},
        "settings": settings,
        "phases": [
            {"sql": sql, "seconds": _seconds(name, seconds), "delay": delay * index, "ramp": ramp}
            for name, (sql, delay, ramp) in WORKLOADS.items()
        ],
        "gap": 0.5,
    }


def run_once(alternative: str, bouncer: PgBouncer, seconds: float) -> dict[str, Any]:
    """One run of one alternative: 4 processes, both workloads; throughput and counters."""
    app = f"eh-bench-{uuid.uuid4().hex[:8]}"
    configs = [_config(alternative, app, bouncer, seconds, i) for i in range(PROCESSES)]
    config = configs[0]
    workers = [start_worker(c) for c in configs]
    for worker in workers:  # imports take seconds when 4 processes start at once
        assert worker.stdout is not None
        line = worker.stdout.readline().strip()
        if line != "READY":
            raise RuntimeError(f"worker not ready: {line} {worker.communicate()[1][-2000:]}")
    start = time.monotonic() + 0.3
    with ConnectionSampler(app, PG_DSN) as sampler:
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(f"{start}\n")
            worker.stdin.flush()
        results = [worker_result(worker, timeout=300) for worker in workers]
    config["start_at"] = start
    phases = []
    for index, name in enumerate(WORKLOADS):
        length = config["phases"][index]["seconds"]
        queries = sum(r["phases"][index]["queries"] for r in results)
        errors = sum(r["phases"][index]["errors"] for r in results)
        end = start + length
        during = [n for t, n in sampler.points if start <= t <= end]
        first = [e for r in results for e in r["phases"][index]["first_errors"]][:3]
        phases.append(
            {"workload": name, "qps": queries / length, "queries": queries, "errors": errors,
             "first_errors": first, "peak": max(during, default=0),
             "max_wait": max(r["phases"][index]["max_wait"] for r in results),
             "first_query": max((r["phases"][index]["first"] or length) for r in results),
             "per_process": [r["phases"][index]["queries"] for r in results]}
        )
        start = end + config["gap"]
    budgets = [b for r in results for b in r["budgets"]]
    return {
        "alternative": alternative,
        "phases": phases,
        "peak": max((n for _, n in sampler.points), default=0),
        "round_trips": sum(b["round_trips"] for b in budgets),
        "round_trips_by_kind": {
            kind: sum(b.get(f"{kind}_round_trips", 0) for b in budgets) for kind in TRIP_KINDS
        },
        "counts": {name: sum(b.get(name, 0) for b in budgets) for name in EXTRA_COUNTS},
        "process_seconds": len(results)
        * sum(p["seconds"] + config["gap"] for p in config["phases"]),
        "physical": sum(b["granted"] for b in budgets),
        "budgets_by_process": budgets,
        "queries": sum(p["queries"] for p in phases),
        "timeline": [(t - config["start_at"], n) for t, n in sampler.points],
    }


TRIP_KINDS = ("acquire", "release", "renew")
EXTRA_COUNTS = (
    "blocking_waits", "empty_waits", "refusals", "handovers", "timeouts", "demand_news", "shed",
)
"""Redis round trips by purpose, as BudgetStats reports them."""


def bench(repeats: int, seconds: float) -> dict[str, Any]:
    bouncer = PgBouncer(pool_size=CAP)
    bouncer.start()
    runs: list[dict[str, Any]] = []
    try:
        order = [FLEET, BOUNCER, UNCAPPED]
        for repeat in range(repeats):
            random.Random(repeat).shuffle(order)
            for alternative in order:
                run = run_once(alternative, bouncer, seconds)
                print(f"  repeat {repeat + 1}: {alternative}: "
                      + ", ".join(f"{p['workload']} {p['qps']:,.0f} q/s" for p in run["phases"])
                      + f" (peak {run['peak']} conns)", flush=True)
                runs.append(run)
    finally:
        bouncer.stop()
    return {"runs": runs, "params": {"repeats": repeats, "seconds": seconds, "cap": CAP,
                                     "processes": PROCESSES, "threads": THREADS}}


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """Median q/s per alternative and workload, per-repeat ratios, peaks, lease cost."""
    runs = data["runs"]
    table: dict[str, dict[str, float]] = {}
    ratios: dict[str, dict[str, float]] = {}
    waits: dict[str, dict[str, float]] = {}
    firsts: dict[str, float] = {}
    for workload in WORKLOADS:
        per_alt = {
            alt: [next(p["qps"] for p in r["phases"] if p["workload"] == workload)
                  for r in runs if r["alternative"] == alt]
            for alt in (FLEET, BOUNCER, UNCAPPED)
        }
        table[workload] = {alt: statistics.median(v) for alt, v in per_alt.items()}
        waits[workload] = {
            alt: max(next(p["max_wait"] for p in r["phases"] if p["workload"] == workload)
                     for r in runs if r["alternative"] == alt)
            for alt in (FLEET, BOUNCER, UNCAPPED)
        }
        firsts[workload] = max(
            next(p["first_query"] for p in r["phases"] if p["workload"] == workload)
            for r in runs if r["alternative"] == FLEET
        )
        pairs = list(zip(per_alt[FLEET], per_alt[BOUNCER], per_alt[UNCAPPED], strict=True))
        ratios[workload] = {
            "fleet / PgBouncer": statistics.median(f / b for f, b, _ in pairs),
            "fleet / uncapped": statistics.median(f / u for f, _, u in pairs),
            "PgBouncer / uncapped": statistics.median(b / u for _, b, u in pairs),
        }
    fleet_runs = [r for r in runs if r["alternative"] == FLEET]
    physical = sum(r["physical"] for r in fleet_runs)
    trips = sum(r["round_trips"] for r in fleet_runs)
    queries = sum(r["queries"] for r in fleet_runs)
    by_kind = {k: sum(r["round_trips_by_kind"][k] for r in fleet_runs) for k in TRIP_KINDS}
    process_seconds = sum(r["process_seconds"] for r in fleet_runs)
    counts = {n: sum(r["counts"][n] for r in fleet_runs) for n in EXTRA_COUNTS}
    return {
        "qps": table,
        "ratios": ratios,
        "max_wait": waits,
        "first_query": firsts,
        "fleet_peak": max(r["peak"] for r in fleet_runs),
        "uncapped_peak": max(r["peak"] for r in runs if r["alternative"] == UNCAPPED),
        "errors": sum(p["errors"] for r in runs for p in r["phases"]),
        "lease_cost": {
            "physical_connections": physical,
            "redis_round_trips": trips,
            "queries": queries,
            "round_trips_per_physical_connection": trips / physical if physical else 0.0,
            "round_trips_per_query": trips / queries if queries else 0.0,
            "by_kind": by_kind,
            "counts": counts,
            "per_physical_connection": {
                k: (n / physical if physical else 0.0) for k, n in by_kind.items()
            },
            "renewals_per_process_second": (
                by_kind["renew"] / process_seconds if process_seconds else 0.0
            ),
        },
    }


def report(summary: dict[str, Any]) -> str:
    lines = ["| workload | fleet mode | PgBouncer | uncapped QueuePool | fleet / PgBouncer "
             "(goal: >= 1.0 SELECT 1, >= 0.9 pg_sleep) | fleet / uncapped | fleet: slowest "
             "process's first query | longest single wait, fleet (PgBouncer) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for workload, values in summary["qps"].items():
        r = summary["ratios"][workload]
        w = summary["max_wait"][workload]
        lines.append(
            f"| {workload} | {values[FLEET]:,.0f} q/s | {values[BOUNCER]:,.0f} q/s | "
            f"{values[UNCAPPED]:,.0f} q/s | {r['fleet / PgBouncer']:.2f}x | "
            f"{r['fleet / uncapped']:.2f}x | {summary['first_query'][workload]:.2f} s | "
            f"{w[FLEET]:.2f} s ({w[BOUNCER]:.2f} s) |"
        )
    cost = summary["lease_cost"]
    lines += [
        "",
        f"- fleet connections in pg_stat_activity, peak: **{summary['fleet_peak']}** "
        f"(cap {CAP}); uncapped QueuePool peak: {summary['uncapped_peak']}",
        f"- failed queries, all runs: {summary['errors']}",
        f"- lease cost (fleet runs): {cost['redis_round_trips']} Redis round trips for "
        f"{cost['physical_connections']} physical connections and {cost['queries']:,} queries: "
        f"{cost['round_trips_per_physical_connection']:.1f} per physical connection, "
        f"{cost['round_trips_per_query']:.4f} per query",
        f"- by kind: acquire {cost['by_kind']['acquire']} "
        f"(**{cost['per_physical_connection']['acquire']:.2f} per physical connection**), "
        f"release {cost['by_kind']['release']} "
        f"({cost['per_physical_connection']['release']:.2f} per physical connection), "
        f"renew {cost['by_kind']['renew']} "
        f"({cost['renewals_per_process_second']:.1f} per process-second)",
        f"- renewals made at once on demand news (pub/sub): {cost['counts']['demand_news']}; "
        f"connections closed to give permits back: {cost['counts']['shed']}",
        f"- of the acquire round trips: refused first asks {cost['counts']['refusals']}, "
        f"blocking waits {cost['counts']['blocking_waits']} "
        f"({cost['counts']['empty_waits']} ended empty); "
        f"permits handed over in-process (no round trip): {cost['counts']['handovers']}",
    ]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> Path:
    """Fleet connections in pg_stat_activity over time, with the cap."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.2))
    for index, run in enumerate(r for r in data["runs"] if r["alternative"] == FLEET):
        xs = [t for t, _ in run["timeline"] if t >= -0.5]
        ys = [n for t, n in run["timeline"] if t >= -0.5]
        ax.step(xs, ys, where="post", lw=1, alpha=0.8, label=f"fleet run {index + 1}")
    ax.axhline(CAP, color="red", ls="--", lw=1, label=f"cap {CAP}")
    begin = 0.0
    for index, workload in enumerate(WORKLOADS):
        length = _seconds(workload, data["params"]["seconds"])
        ax.axvspan(begin, begin + length, color="gray", alpha=0.06 + 0.08 * (index % 2))
        ax.text(begin + 0.1, CAP + 2.3, workload.replace(", ", "\n"), fontsize=6.5, va="top")
        begin += length + 0.5
    ax.set_xlabel("s since the load started (shaded: one traffic shape each)")
    ax.set_ylabel("server connections")
    ax.set_ylim(0, CAP + 4)
    ax.set_title(f"Fleet budget on default settings: {PROCESSES} processes x {THREADS} threads, "
                 f"cap {CAP}, counted in pg_stat_activity", fontsize=10)
    ax.legend(fontsize=8, ncols=4, loc="lower right", frameon=False)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_fleet", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one short repeat; no plot")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    repeats, seconds = (1, 1.5) if args.quick else (3, 4.0)
    when = utc_now()
    print(f"bench_fleet: {PROCESSES} processes x {THREADS} threads, cap {CAP}, {when}")
    data = bench(repeats, seconds)
    summary = summarize(data)
    load = os.getloadavg()
    print(report(summary))
    print(f"- load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
          f"({os.cpu_count()} CPUs)")
    path = write_results("fleet", {"machine": machine_info(), "when": when, **data,
                                   "summary": summary})
    print(f"results: {path}")
    if not args.quick and not args.no_plots and plotting_available():
        print(f"plot: {plot(data, PLOTS_DIR / 'fleet_cap.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
