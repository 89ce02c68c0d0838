"""Fleet budgets (issue 5): fleet mode vs PgBouncer vs uncapped QueuePool, one run.

    python -m benchmarks.bench_fleet            # full run (~2-3 min), plot into docs/img/
    python -m benchmarks.bench_fleet --quick    # smoke run (~40 s), prints only

Same load for every alternative: 4 worker processes x 8 threads
(tests/fleet_worker.py), each thread running ``SELECT 1``, then
``SELECT pg_sleep(0.005)``, for a few seconds each, all processes starting
together. Same cap: fleet mode leases 6 connections in Redis; PgBouncer
(transaction mode, installed by scripts/install-pgbouncer.sh when missing)
keeps 6 server connections; the uncapped QueuePool opens what its 4 x 8
threads want. Alternatives run interleaved, repeated; medians and ratios of
the same run are reported. A sampler counts the fleet's connections in
pg_stat_activity throughout (the cap must never be exceeded), and every
worker reports its Redis round trips, physical connections and queries.
"""

from __future__ import annotations

import argparse
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

CAP = 6
PROCESSES = 4
THREADS = 8
WORKLOADS = {"SELECT 1": "SELECT 1", "pg_sleep 5 ms": "SELECT pg_sleep(0.005)"}
FLEET, BOUNCER, UNCAPPED = "fleet mode (cap 6)", "PgBouncer (6 server conns)", "QueuePool uncapped"


def _config(alternative: str, app: str, bouncer: PgBouncer, seconds: float) -> dict[str, Any]:
    engine_params: dict[str, Any] = {"connect_args": {"application_name": app}}
    extra: dict[str, Any] = {"engine_params": engine_params}
    settings: dict[str, Any] = {"cleanup_interval": 0.5, "ask_timeout": 30}
    uri = PG_URI
    if alternative == FLEET:
        extra["max_connections"] = CAP
        engine_params["pool_timeout"] = 60
        settings.update(
            fleet_url=SHARED_REDIS, fleet_prefix=f"eh-bench-{uuid.uuid4().hex[:8]}",
            fleet_lease_ttl=10,
        )
    else:
        engine_params.update(pool_size=THREADS, max_overflow=0)
        if alternative == BOUNCER:
            uri = bouncer.uri
            engine_params["connect_args"]["prepare_threshold"] = None
    return {
        "action": "phases",
        "threads": THREADS,
        "spec": {"id": f"bench-{alternative[:5]}", "uri": uri, "extra": extra},
        "settings": settings,
        "phases": [{"sql": sql, "seconds": seconds} for sql in WORKLOADS.values()],
        "gap": 0.5,
    }


def run_once(alternative: str, bouncer: PgBouncer, seconds: float) -> dict[str, Any]:
    """One run of one alternative: 4 processes, both workloads; throughput and counters."""
    app = f"eh-bench-{uuid.uuid4().hex[:8]}"
    config = _config(alternative, app, bouncer, seconds)
    workers = [start_worker(config) for _ in range(PROCESSES)]
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
        queries = sum(r["phases"][index]["queries"] for r in results)
        errors = sum(r["phases"][index]["errors"] for r in results)
        end = start + seconds
        during = [n for t, n in sampler.points if start <= t <= end]
        first = [e for r in results for e in r["phases"][index]["first_errors"]][:3]
        phases.append(
            {"workload": name, "qps": queries / seconds, "queries": queries, "errors": errors,
             "first_errors": first, "peak": max(during, default=0)}
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
        "process_seconds": len(results) * (seconds * len(WORKLOADS) + config["gap"]),
        "physical": sum(b["granted"] for b in budgets),
        "queries": sum(p["queries"] for p in phases),
        "timeline": [(t - config["start_at"], n) for t, n in sampler.points],
    }


TRIP_KINDS = ("acquire", "release", "renew")
EXTRA_COUNTS = ("blocking_waits", "empty_waits", "refusals", "handovers", "timeouts")
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
    for workload in WORKLOADS:
        per_alt = {
            alt: [next(p["qps"] for p in r["phases"] if p["workload"] == workload)
                  for r in runs if r["alternative"] == alt]
            for alt in (FLEET, BOUNCER, UNCAPPED)
        }
        table[workload] = {alt: statistics.median(v) for alt, v in per_alt.items()}
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
             "(goal >= 0.8) | fleet / uncapped |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for workload, values in summary["qps"].items():
        r = summary["ratios"][workload]
        lines.append(
            f"| {workload} | {values[FLEET]:,.0f} q/s | {values[BOUNCER]:,.0f} q/s | "
            f"{values[UNCAPPED]:,.0f} q/s | {r['fleet / PgBouncer']:.2f}x | "
            f"{r['fleet / uncapped']:.2f}x |"
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
        f"- of the acquire round trips: refused first asks {cost['counts']['refusals']}, "
        f"blocking waits {cost['counts']['blocking_waits']} "
        f"({cost['counts']['empty_waits']} ended empty); "
        f"permits handed over in-process (no round trip): {cost['counts']['handovers']}",
    ]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> Path:
    """Fleet connections in pg_stat_activity over time, with the cap."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    for index, run in enumerate(r for r in data["runs"] if r["alternative"] == FLEET):
        xs = [t for t, _ in run["timeline"] if t >= -0.5]
        ys = [n for t, n in run["timeline"] if t >= -0.5]
        ax.step(xs, ys, where="post", lw=1, alpha=0.8, label=f"fleet run {index + 1}")
    ax.axhline(CAP, color="red", ls="--", lw=1, label=f"cap {CAP}")
    seconds = data["params"]["seconds"]
    ax.axvspan(0, seconds, color="gray", alpha=0.08)
    ax.axvspan(seconds + 0.5, 2 * seconds + 0.5, color="gray", alpha=0.16)
    ax.set_xlabel("s since the load started (light: SELECT 1, darker: pg_sleep 5 ms)")
    ax.set_ylabel("server connections")
    ax.set_ylim(0, CAP + 3)
    ax.set_title(f"Fleet budget: {PROCESSES} processes x {THREADS} threads, cap {CAP}, "
                 "counted in pg_stat_activity", fontsize=10)
    ax.legend(fontsize=8, ncols=4, loc="upper right", frameon=False)
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
    print(report(summary))
    path = write_results("fleet", {"machine": machine_info(), "when": when, **data,
                                   "summary": summary})
    print(f"results: {path}")
    if not args.quick and not args.no_plots and plotting_available():
        print(f"plot: {plot(data, PLOTS_DIR / 'fleet_cap.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
