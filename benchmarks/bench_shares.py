"""Shares by query source: dashboards next to long SQL Lab queries on a cap of 4.

    python -m benchmarks.bench_shares            # full run (~2 min)
    python -m benchmarks.bench_shares --quick    # smoke run (~25 s)

One EngineManager, one PostgreSQL database seen as two specs with
``max_connections=4``: one plain (the pool's wait queue is first come, first
served) and one with ``connection_shares`` ``{"DASHBOARD": 3, "SQL_LAB": 1}``.
Each phase runs 8 threads of SQL Lab queries (``SELECT pg_sleep(2)``) and 8
threads of dashboard queries (``SELECT pg_sleep(0.01)``) for ``--seconds``,
every thread in a loop: check out (timed: the *wait*), query, check in.
Two dashboard workloads: a closed loop (each dashboard thread asks again as
soon as its query is done) and one with 100 ms of think time between a
thread's queries (a person reading the chart: the pool goes quiet for the
dashboards often enough that SQL Lab fills it). Phases alternate (FIFO,
shares, FIFO, shares...) so both see the same machine load. Reported:
dashboard wait p50/p99, queries per second by source and in total, and the
peak of the database's connections in ``pg_stat_activity`` (the cap holds
either way). The pool's wait queue is FIFO with a hand-off in both
alternatives (a returned connection goes to the longest waiter): the
baseline is honest first come, first served, not QueuePool's "whoever asks
next".

    python -m benchmarks.bench_shares --fleet    # fleet-wide: two processes (~2 min)

``--fleet``: the same load split over two processes of one fleet (Redis at
``ENGINEHOUSE_BENCH_REDIS``, default ``redis://127.0.0.1:6379/0``; a
``fleet_prefix`` of the run's own, every other setting the default): one
runs the 8 SQL Lab threads, the other the 8 dashboard threads, on one fleet
cap of 4. Without shares the fleet splits the cap by process (2 + 2 while
both wait); with shares, by the weighted demand of the sources each process
serves (DASHBOARD 3 : SQL_LAB 1, so 3 + 1; see docs/fleet.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import text

if not __package__:  # run as a script (python benchmarks/bench_shares.py): find the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    PG_DSN,
    PG_URI,
    PLOTS_DIR,
    ROOT,
    ConnectionSampler,
    machine_info,
    percentile,
    plotting_available,
    utc_now,
    write_results,
)
from enginehouse import DatabaseSpec, EngineManager

CAP = 4
THREADS = 8  # per source
SQL_LAB_QUERY = "SELECT pg_sleep(2)"
DASHBOARD_QUERY = "SELECT pg_sleep(0.01)"
SHARES = {"DASHBOARD": 3, "SQL_LAB": 1}
FIFO, FAIR = "first come, first served", "connection_shares DASHBOARD 3 / SQL_LAB 1"
SOURCES = ("DASHBOARD", "SQL_LAB")
WORKLOADS = {"closed loop": 0.0, "100 ms think time": 0.1}
"""Dashboard workloads: seconds a dashboard thread pauses between its queries."""


RUN = uuid.uuid4().hex[:6]
"""Names this run's connections in pg_stat_activity (two runs at once count apart)."""

REDIS = os.environ.get("ENGINEHOUSE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
"""The fleet's Redis (``--fleet``)."""
FLEET_PREFIX = f"bench-shares-{RUN}"
"""The run's own ``fleet_prefix`` (runs do not share budgets)."""


def spec(alternative: str) -> DatabaseSpec:
    app = f"bench-shares-{'fair' if alternative == FAIR else 'fifo'}-{RUN}"
    extra: dict[str, Any] = {
        "max_connections": CAP,
        "engine_params": {"pool_timeout": 120, "connect_args": {"application_name": app}},
    }
    if alternative == FAIR:
        extra["connection_shares"] = SHARES
    return DatabaseSpec(id=app, uri=PG_URI, extra=extra)


def phase(
    manager: EngineManager, alternative: str, seconds: float, workload: str
) -> dict[str, Any]:
    """Run the mixed load for ``seconds`` in this process; waits (s) and queries by source."""
    database = spec(alternative)
    with manager.connect(database, source="DASHBOARD"):  # the engine exists before timing
        pass
    with ConnectionSampler(str(database.id), PG_DSN, every=0.05) as sampler:
        load = _load(manager, database, SOURCES, seconds, WORKLOADS[workload])
    manager.dispose(database.id)
    return {"alternative": alternative, "workload": workload, "seconds": seconds, **load,
            "peak_connections": sampler.peak}


def _load(
    manager: EngineManager, database: DatabaseSpec, sources: tuple[str, ...], seconds: float,
    think: float,
) -> dict[str, Any]:
    """THREADS threads per source, each in a loop: check out (timed), query, check in."""
    queries = {"SQL_LAB": SQL_LAB_QUERY, "DASHBOARD": DASHBOARD_QUERY}
    waits: dict[str, list[float]] = {source: [] for source in SOURCES}
    done: dict[str, list[float]] = {source: [] for source in SOURCES}  # completion times
    errors: list[str] = []
    slow: list[tuple[str, float, float]] = []  # (source, seconds into the phase, wait)
    start = threading.Event()
    deadline = 0.0

    def loop(source: str) -> None:
        statement = text(queries[source])
        start.wait()
        clock = time.perf_counter
        while clock() < deadline:
            asked = clock()
            try:
                with manager.connect(database, source=source) as connection:
                    waits[source].append(clock() - asked)
                    if waits[source][-1] > 1.0:  # (when in the phase a long wait began)
                        slow.append((source, asked - deadline + seconds, waits[source][-1]))
                    connection.execute(statement)
            except Exception as exc:
                errors.append(type(exc).__name__)
                continue
            finished = clock()
            if finished <= deadline:
                done[source].append(finished)  # (list appends are atomic; += is not)
            if think and source == "DASHBOARD":
                time.sleep(think)

    threads = [
        threading.Thread(target=loop, args=(source,), daemon=True)
        for source in ("SQL_LAB", "DASHBOARD")  # SQL Lab's threads start first
        if source in sources
        for _ in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    deadline = time.perf_counter() + seconds
    start.set()
    for thread in threads:
        thread.join(seconds + 180)
    return {"waits": waits, "done": {s: len(t) for s, t in done.items()}, "errors": errors,
            "slow": slow}


def fleet_phase(alternative: str, seconds: float, workload: str) -> dict[str, Any]:
    """The mixed load over two processes of one fleet: SQL Lab in one, dashboards in the other."""
    database = spec(alternative)
    config = {
        "spec": {"id": database.id, "uri": PG_URI, "extra": database.extra},
        "fleet_url": REDIS, "fleet_prefix": FLEET_PREFIX, "seconds": seconds,
        "think": WORKLOADS[workload], "threads": THREADS, "sql_lab_query": SQL_LAB_QUERY,
        "dashboard_query": DASHBOARD_QUERY,
    }
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_shares", "--worker",
             json.dumps({**config, "source": source})],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for source in SOURCES
    ]
    try:
        for worker in workers:  # each has its manager, its engine and one connection made
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        with ConnectionSampler(str(database.id), PG_DSN, every=0.05) as sampler:
            for worker in workers:
                assert worker.stdin is not None
                worker.stdin.write("go\n")
                worker.stdin.flush()
            loads = [json.loads(worker.communicate(timeout=seconds + 240)[0]) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    merged: dict[str, Any] = {"waits": {}, "done": {}, "errors": []}
    for source, load in zip(SOURCES, loads, strict=True):
        merged["waits"][source] = load["waits"][source]
        merged["done"][source] = load["done"][source]
        merged["errors"] += load["errors"]
        merged.setdefault("slow", []).extend(load["slow"])
        merged.setdefault("budgets", {})[source] = load.get("budgets")
    return {"alternative": alternative, "workload": workload, "seconds": seconds, **merged,
            "peak_connections": sampler.peak}


def worker(config: dict[str, Any]) -> int:
    """One process of ``--fleet``: its source's threads, on a fleet manager (defaults)."""
    global THREADS, SQL_LAB_QUERY, DASHBOARD_QUERY
    THREADS, SQL_LAB_QUERY = config["threads"], config["sql_lab_query"]
    DASHBOARD_QUERY = config["dashboard_query"]
    database = DatabaseSpec(**config["spec"])
    settings = {"fleet_url": config["fleet_url"], "fleet_prefix": config["fleet_prefix"]}
    with EngineManager(mode="singleton", **settings) as manager:
        with manager.connect(database, source=config["source"]):
            pass
        print("ready", flush=True)
        sys.stdin.readline()
        load = _load(manager, database, (config["source"],), config["seconds"], config["think"])
        load["budgets"] = [b.model_dump() for b in manager.stats().budgets]
    print(json.dumps(load, default=str), flush=True)
    return 0


def run(seconds: float, repeats: int, *, fleet: bool = False) -> dict[str, Any]:
    phases: list[dict[str, Any]] = []
    with EngineManager(mode="singleton") as manager:  # defaults
        for index in range(repeats):
            for workload in WORKLOADS:
                order = (FIFO, FAIR) if index % 2 == 0 else (FAIR, FIFO)
                for alternative in order:
                    if fleet:
                        result = fleet_phase(alternative, seconds, workload)
                    else:
                        result = phase(manager, alternative, seconds, workload)
                    print(f"  {workload}, {alternative}: {_line(result)}", flush=True)
                    phases.append(result)
    summaries = {w: summarize([p for p in phases if p["workload"] == w]) for w in WORKLOADS}
    params = {**_params(seconds, repeats), "fleet": fleet}
    return {"params": params, "phases": phases, "summary": summaries}


def summarize(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """Per alternative: pooled dashboard waits, q/s by source and in total, peak connections."""
    out: dict[str, Any] = {}
    for alternative in (FIFO, FAIR):
        mine = [p for p in phases if p["alternative"] == alternative]
        seconds = sum(p["seconds"] for p in mine)
        dashboard = [w for p in mine for w in p["waits"]["DASHBOARD"]]
        sql_lab = [w for p in mine for w in p["waits"]["SQL_LAB"]]
        qps = {s: sum(p["done"][s] for p in mine) / seconds for s in SOURCES}
        out[alternative] = {
            "dashboard_wait_p50": percentile(dashboard, 50),
            "dashboard_wait_p99": percentile(dashboard, 99),
            "sql_lab_wait_p50": percentile(sql_lab, 50),
            "sql_lab_wait_p99": percentile(sql_lab, 99),
            "qps": qps,
            "total_qps": sum(qps.values()),
            "errors": sum(len(p["errors"]) for p in mine),
            "peak_connections": max(p["peak_connections"] for p in mine),
        }
    fifo, fair = out[FIFO], out[FAIR]
    out["dashboard_p99_wait_ratio"] = fifo["dashboard_wait_p99"] / fair["dashboard_wait_p99"]
    out["total_throughput_ratio"] = fair["total_qps"] / fifo["total_qps"]
    return out


def _params(seconds: float, repeats: int) -> dict[str, Any]:
    return {
        "cap": CAP, "threads_per_source": THREADS, "sql_lab_query": SQL_LAB_QUERY,
        "dashboard_query": DASHBOARD_QUERY, "shares": SHARES, "seconds": seconds,
        "repeats": repeats, "pool_timeout": 120, "dashboard_think_seconds": WORKLOADS,
    }


def _line(result: dict[str, Any]) -> str:
    dashboard = result["waits"]["DASHBOARD"]
    p99 = percentile(dashboard, 99) if dashboard else float("nan")
    return (
        f"dashboard wait p99 {p99 * 1000:.0f} ms, queries {result['done']}, "
        f"peak connections {result['peak_connections']}, errors {len(result['errors'])}"
    )


def report(data: dict[str, Any]) -> str:
    fleet = bool(data["params"].get("fleet"))
    return "\n\n".join(
        f"Dashboards: {workload}\n\n" + _table(data["summary"][workload], fleet=fleet)
        for workload in WORKLOADS
    )


def _table(summary: dict[str, Any], *, fleet: bool = False) -> str:
    lines = [
        "| measure | " + " | ".join((FIFO, FAIR)) + " |",
        "|---|---|---|",
    ]
    rows = [
        ("dashboard wait p50", lambda s: f"{s['dashboard_wait_p50'] * 1000:.1f} ms"),
        ("dashboard wait p99", lambda s: f"{s['dashboard_wait_p99'] * 1000:.1f} ms"),
        ("SQL Lab wait p50", lambda s: f"{s['sql_lab_wait_p50'] * 1000:.0f} ms"),
        ("SQL Lab wait p99", lambda s: f"{s['sql_lab_wait_p99'] * 1000:.0f} ms"),
        ("dashboard queries/s", lambda s: f"{s['qps']['DASHBOARD']:.1f}"),
        ("SQL Lab queries/s", lambda s: f"{s['qps']['SQL_LAB']:.2f}"),
        ("total queries/s", lambda s: f"{s['total_qps']:.1f}"),
        ("peak connections (pg_stat_activity)", lambda s: str(s["peak_connections"])),
        ("errors", lambda s: str(s["errors"])),
    ]
    for label, cell in rows:
        lines.append(f"| {label} | {cell(summary[FIFO])} | {cell(summary[FAIR])} |")
    ratio, throughput = summary["dashboard_p99_wait_ratio"], summary["total_throughput_ratio"]
    if fleet:  # (issue 15's goals are for one process: across processes FIFO splits by process)
        return "\n".join([
            *lines, "",
            f"dashboard p99 wait, by process / by source: {ratio:.1f}x",
            f"total throughput, by source / by process: {throughput:.2f}x",
        ])
    lines += [
        "",
        f"dashboard p99 wait, FIFO / shares: {ratio:.1f}x (goal >= 10x: "
        f"{'met' if ratio >= 10 else 'NOT met'})",
        f"total throughput, shares / FIFO: {throughput:.2f}x (goal >= 0.9x: "
        f"{'met' if throughput >= 0.9 else 'NOT met'})",
    ]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> Path:
    """Per workload: dashboard waits (sorted, log scale) and queries per second, FIFO vs shares."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.4), width_ratios=(3, 2))
    colors = {FIFO: "tab:red", FAIR: "tab:blue"}
    fleet = bool(data["params"].get("fleet"))
    names = {FIFO: "split by process" if fleet else FIFO,
             FAIR: f"{FAIR} fleet-wide" if fleet else FAIR}
    for (left, right), workload in zip(axes, WORKLOADS, strict=True):
        summary = data["summary"][workload]
        for alternative in (FIFO, FAIR):
            waits = sorted(
                w * 1000 for p in data["phases"]
                if p["alternative"] == alternative and p["workload"] == workload
                for w in p["waits"]["DASHBOARD"]
            )
            xs = [100 * (i + 1) / len(waits) for i in range(len(waits))]
            p99 = summary[alternative]["dashboard_wait_p99"] * 1000
            left.plot(xs, [max(w, 0.01) for w in waits], color=colors[alternative], lw=1.5,
                      label=f"{names[alternative]} (p99 {p99:,.1f} ms)")
        left.set_yscale("log")
        left.set_xlabel("percentile of dashboard checkouts")
        left.set_ylabel("wait for a connection (ms, log)")
        left.set_title(f"Dashboards, {workload}: wait for a connection", fontsize=10)
        left.legend(fontsize=8, frameon=False, loc="upper left")
        left.grid(alpha=0.3, which="both")
        width = 0.38
        for offset, alternative in ((-width / 2, FIFO), (width / 2, FAIR)):
            qps = summary[alternative]["qps"]
            values = [qps["DASHBOARD"], qps["SQL_LAB"], sum(qps.values())]
            bars = right.bar([i + offset for i in range(3)], values, width,
                             color=colors[alternative],
                             label=names[alternative].split(" DASHBOARD")[0])
            right.bar_label(bars, fmt="%.1f", fontsize=7)
        right.set_xticks(range(3), ["dashboard", "SQL Lab", "total"])
        right.set_ylabel("queries per second")
        right.set_title(f"Dashboards, {workload}: throughput", fontsize=10)
        right.legend(fontsize=8, frameon=False)
        right.grid(alpha=0.3, axis="y")
    params = data["params"]
    where = "Fleet cap" if fleet else "Cap"
    split = " (two processes)" if fleet else ""
    fig.suptitle(
        f"{where} {params['cap']}{split}: {params['threads_per_source']} threads of SQL Lab "
        f"(pg_sleep(2)) + {params['threads_per_source']} of dashboards (10 ms queries), "
        f"{params['repeats']} x {params['seconds']:g} s per alternative and workload",
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short phase each")
    parser.add_argument("--fleet", action="store_true",
                        help="two processes of one fleet (SQL Lab in one, dashboards in the other)")
    parser.add_argument("--seconds", type=float, default=None, help="length of one phase")
    parser.add_argument("--repeats", type=int, default=None, help="phases per alternative")
    parser.add_argument("--plots", type=Path, default=PLOTS_DIR, help="where the plot goes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a --fleet process (JSON config)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    seconds = args.seconds or (8.0 if args.quick else 20.0)
    repeats = args.repeats or (1 if args.quick else 3)
    print(f"bench_shares{' --fleet' if args.fleet else ''}: {utc_now()}", flush=True)
    data = run(seconds, repeats, fleet=args.fleet)
    data.update(machine=machine_info(), when=utc_now())
    print(report(data))
    name = "shares-fleet" if args.fleet else "shares"
    print(f"results: {write_results(name, data)}")
    if plotting_available():
        print(f"plot: {plot(data, args.plots / f'{name}.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
