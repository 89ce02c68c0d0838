"""Held permits across Redis Sentinel failovers, from a real run (docs/img/fleet_failover.png).

A private master + replica + 3 Sentinels (tests/redis_ha_fixtures.py) on free
loopback ports; ``--workers`` processes of ``--threads`` threads run
``SELECT pg_sleep(0.02)`` against PostgreSQL under ``max_connections=--cap``
with ``fleet_url=redis+sentinel://...``. At 1/3 of the run the Sentinels are
asked for a failover (``SENTINEL FAILOVER``); at 2/3 the new master is killed
(SIGKILL). PostgreSQL's connections of the run are counted in pg_stat_activity
every 2 ms; the workers record each query and each error with its time.

    .venv/sqla2/bin/python benchmarks/bench_failover.py [--flavour valkey] [--plot PATH]

Prints one JSON summary: peak connections, time spent above the cap, errors by
class (and whether each is an EngineManagerError), the gap in service per event.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from redis_ha_fixtures import SentinelGroup, server_binary  # noqa: E402

from benchmarks.common import ConnectionSampler  # noqa: E402

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PG_URI = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
WORKER = ROOT / "tests" / "ha_worker.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flavour", choices=["redis", "valkey"], default="redis")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--cap", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=24.0)
    # Not the default (30 s): keepers follow the Sentinel master on each Janitor round, so
    # this bounds the window after a failover; 1 s shows it within a short run (docs/fleet.md).
    parser.add_argument("--cleanup-interval", type=float, default=1.0)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="eh-failover-"))
    group = SentinelGroup(server_binary(args.flavour), workdir)
    try:
        summary, data = run(group, args)
    finally:
        group.stop()
    print(json.dumps(summary, indent=2))
    if args.plot:
        plot(data, summary, args, args.plot)


def run(group: SentinelGroup, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    app = f"eh-failover-{uuid.uuid4().hex[:8]}"
    settings = {"fleet_url": group.url, "fleet_prefix": f"eh-bench-{uuid.uuid4().hex[:8]}",
                "cleanup_interval": args.cleanup_interval,
                "fleet_lease_ttl": max(10.0, 4 * args.cleanup_interval), "ask_timeout": 10}
    spec = {"id": app, "uri": PG_URI, "extra": {"max_connections": args.cap, "engine_params": {
        "pool_timeout": 30, "connect_args": {"application_name": app}}}}
    config = {"spec": spec, "sql": "SELECT pg_sleep(0.02)", "threads": args.threads,
              "seconds": args.seconds, "settings": settings}
    events: list[tuple[str, float, float]] = []
    with ConnectionSampler(app, PG_DSN, every=0.002) as sampler:
        workers = [subprocess.Popen([sys.executable, str(WORKER), json.dumps(config)],
                                    stdout=subprocess.PIPE, text=True) for _ in range(args.workers)]
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "READY"
        start = time.monotonic()
        time.sleep(args.seconds / 3 - 1)
        began = time.monotonic()
        group.failover()
        events.append(("SENTINEL FAILOVER", began, time.monotonic()))
        time.sleep(max(0.0, start + 2 * args.seconds / 3 - 1 - time.monotonic()))
        began = time.monotonic()
        group.kill_master()
        events.append(("master killed", began, time.monotonic()))
        results = []
        for worker in workers:
            out, _ = worker.communicate(timeout=120)
            results.append(json.loads(out.strip().splitlines()[-1]))
    done = sorted(t for r in results for t in r["done"])
    errors = [e for r in results for e in r["errors"]]
    over = [(t, n) for t, n in sampler.points if n > args.cap]
    step = sampler.points[1][0] - sampler.points[0][0] if len(sampler.points) > 1 else 0.002
    summary = {
        "flavour": args.flavour, "workers": args.workers, "threads": args.threads,
        "cap": args.cap, "cleanup_interval": args.cleanup_interval,
        "queries": len(done), "peak": sampler.peak, "samples": len(sampler.points),
        "samples_over_cap": len(over), "seconds_over_cap": round(len(over) * step, 3),
        "errors": _count(errors),
        "events": [
            {"event": name, "began": round(b - start, 2), "new_master_after": round(e - b, 2),
             "longest_gap_in_queries": round(_gap(done, b - 1, e + 5), 2)}
            for name, b, e in events
        ],
    }
    data = {"points": sampler.points, "done": done, "errors": errors, "events": events,
            "start": start}
    return summary, data


def _count(errors: list[list[Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, ours, _ in errors:
        key = f"{name} ({'EngineManagerError' if ours else 'FOREIGN'})"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _gap(done: list[float], since: float, until: float) -> float:
    """The longest time without a finished query in [since, until]."""
    times = [since, *(t for t in done if since <= t <= until), until]
    return max(b - a for a, b in itertools.pairwise(times))


def plot(data: dict[str, Any], summary: dict[str, Any], args: argparse.Namespace,
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = data["start"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    xs = [t - start for t, _ in data["points"]]
    top.step(xs, [n for _, n in data["points"]], where="post", lw=0.8,
             label="PostgreSQL connections (pg_stat_activity)")
    top.axhline(args.cap, color="red", ls="--", lw=1, label=f"cap ({args.cap})")
    bucket = 0.25
    bins: dict[int, int] = {}
    for t in data["done"]:
        bins[int((t - start) // bucket)] = bins.get(int((t - start) // bucket), 0) + 1
    errs: dict[int, int] = {}
    for _, _, t in data["errors"]:
        errs[int((t - start) // bucket)] = errs.get(int((t - start) // bucket), 0) + 1
    keys = range(min(bins, default=0), max(bins, default=0) + 1)
    bottom.plot([k * bucket for k in keys], [bins.get(k, 0) / bucket for k in keys], lw=0.8,
                label="queries/s")
    bottom.bar([k * bucket for k in errs], [n / bucket for n in errs.values()], width=bucket,
               color="orange", label="FleetUnavailableError/s (no master)")
    for name, began, ended in data["events"]:
        for axis in (top, bottom):
            axis.axvspan(began - start, ended - start, color="grey", alpha=0.25)
        top.annotate(name, (began - start, args.cap + 0.6), fontsize=8)
    top.set_ylim(0, max(args.cap + 2, summary["peak"] + 1))
    top.set_ylabel("connections")
    top.legend(loc="lower right", fontsize=8)
    bottom.set_ylabel("per second")
    bottom.set_xlabel("seconds (grey: until the Sentinels name a new master that takes writes)")
    bottom.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"fleet budget across Sentinel failovers ({summary['flavour']}): "
                 f"{args.workers} processes x {args.threads} threads, cap {args.cap}, "
                 f"cleanup_interval {args.cleanup_interval} s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
