"""Stock Superset 6.1.0 against Superset with enginehouse (SINGLETON), served side by side.

One run, one venv (.venv/superset, scripts/superset-env.sh), one metadata database, two gunicorn
servers (2 gthread workers, 4 threads each): ``stock`` (superset_config.py as shipped) and
``enginehouse`` (the same plus the two lines and ``ENGINE_MANAGER_MODE = "singleton"``).
SQL Lab's synchronous ``SELECT 1`` through the REST API, sequential and with 8 concurrent
clients, on PostgreSQL direct and behind a throwaway sshd (RSA key), in blocks. Sequential
queries alternate query by query (one per server per round, order shuffled per round, seeded),
so load on this shared machine hits both alike; the ratio is reported as the ratio of p50s, as
the median of per-pair ratios, and for gunicorn's own time per request (its access log), which
leaves out the client and HTTP. The 8-client rounds run per server, in a shuffled order.

Each server has its own target databases and its own bastion, so from outside Superset we count
new PostgreSQL sessions (``pg_stat_database.sessions``, settled at the end) and SSH logins
(sshd's log) per 1,000 queries of each server. Goals (issue 12): direct p50 <= 0.9x stock,
SSH p50 <= 0.4x stock, <= 10 new server sessions per 1,000 queries.

    python -m benchmarks.bench_superset            # full run, ~6-10 min; plot into docs/img/
    python -m benchmarks.bench_superset --quick    # smoke run (too few queries to judge)
    python -m benchmarks.bench_superset --replot benchmarks/results/superset-latest.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import (
    PLOTS_DIR,
    ROOT,
    machine_info,
    paired_ratio,
    plotting_available,
    summary,
    utc_now,
    write_results,
)

sys.path.insert(0, str(ROOT / "tests"))
from sshd_fixtures import USER
from superset_e2e.bastion import LoggingSshd, start_bastion, stop_bastion
from superset_e2e.harness import (
    Server,
    SupersetClient,
    Variant,
    create_database,
    drop_database,
    served_times,
    sessions_opened,
    settled_sessions,
    superset_site,
    wait_for,
)

VARIANTS = {
    "stock": Variant("stock"),
    "enginehouse": Variant("enginehouse-singleton", enginehouse_mode="singleton"),
}
CASES = ("direct", "ssh")
CONCURRENCY = 8
SQL = "SELECT 1 AS one"
PAUSE = 0.05
RETRIED: list[str] = []
"""One entry per query sent again after a keep-alive race (see timed_query)."""
"""Seconds before each sequential query (see sequential_pairs)."""


@dataclass(frozen=True)
class Scale:
    blocks: int = 6
    sequential: int = 40  # queries per block, per server and case
    concurrent: int = 5  # queries per client per block (8 clients)
    warmup: int = 3


QUICK = Scale(blocks=1, sequential=3, concurrent=1, warmup=1)


@dataclass
class Target:
    """One Superset database row of one server: its PostgreSQL database, maybe its bastion."""

    variant: str
    case: str
    dbname: str
    database_id: int = 0
    bastion: LoggingSshd | None = None


def timed_queries(client: SupersetClient, database_id: int, count: int) -> list[float]:
    return [timed_query(client, database_id) for _ in range(count)]


def timed_query(client: SupersetClient, database_id: int) -> float:
    """One ``SELECT 1``'s latency. A kept-alive connection gunicorn closed while this client
    sat idle (``--keep-alive``, 2 s; the 8-client rounds wait through the others' phases) can
    race the request: httpx then reports that the server sent no response. That attempt
    never reached Superset; it is counted in :data:`RETRIED` and the query sent again."""
    for attempt in range(2):
        started = time.perf_counter()
        try:
            rows = client.query_rows(database_id, SQL)
        except (httpx.RemoteProtocolError, httpx.ReadError):
            if attempt:
                raise
            RETRIED.append(str(client.http.base_url))
            continue
        elapsed = time.perf_counter() - started
        if rows != [{"one": 1}]:
            raise RuntimeError(f"unexpected rows {rows!r}")
        return elapsed
    raise AssertionError("unreachable")


def concurrent_queries(
    clients: list[SupersetClient], database_id: int, per_client: int
) -> tuple[list[float], float]:
    """Every client runs ``per_client`` queries at once; latencies and queries per second."""
    barrier = threading.Barrier(len(clients))

    def run(client: SupersetClient) -> list[float]:
        barrier.wait()
        return timed_queries(client, database_id, per_client)

    started = time.perf_counter()
    with ThreadPoolExecutor(len(clients)) as pool:
        results = list(pool.map(run, clients))
    elapsed = time.perf_counter() - started
    return [v for r in results for v in r], len(clients) * per_client / elapsed


def create_targets(api: SupersetClient, bastions: dict[str, LoggingSshd]) -> list[Target]:
    targets = []
    for variant in VARIANTS:
        for case in CASES:
            target = Target(variant, case, f"bench_superset_{variant}_{case}")
            uri = create_database(target.dbname)
            fields: dict[str, Any] = {}
            if case == "ssh":
                target.bastion = bastions[variant]
                fields["ssh_tunnel"] = {
                    "server_address": "127.0.0.1", "server_port": target.bastion.port,
                    "username": USER, "private_key": target.bastion.keys["rsa"],
                }
            target.database_id = api.create_database(f"bench-{variant}-{case}", uri, **fields)
            targets.append(target)
    return targets


def run(scale: Scale, seed: int = 12) -> dict[str, Any]:
    bastions = {variant: start_bastion() for variant in VARIANTS}
    targets: list[Target] = []
    try:
        with superset_site(VARIANTS["stock"]) as site:
            servers: dict[str, Server] = {
                name: site.start_gunicorn(variant, wait=False) for name, variant in VARIANTS.items()
            }
            for server in servers.values():
                server.wait_healthy()
            with servers["stock"].client() as api:
                targets = create_targets(api, bastions)
            return measure(servers, targets, scale, seed)
    finally:
        for target in targets:
            drop_database(target.dbname)
        for bastion in bastions.values():
            stop_bastion(bastion)


def measure(
    servers: dict[str, Server], targets: list[Target], scale: Scale, seed: int
) -> dict[str, Any]:
    clients = {name: [s.client() for _ in range(CONCURRENCY)] for name, s in servers.items()}
    samples: dict[str, list[float]] = {}
    served: dict[str, list[float]] = {}
    throughput: dict[str, list[float]] = {}
    counted: dict[str, int] = {}
    for target in targets:  # warm both servers (imports, first engines), then start counting
        if target.case == "direct":
            servers[target.variant].warm_up(target.database_id)  # every worker, once
        timed_queries(clients[target.variant][0], target.database_id, scale.warmup)
        # One round at the measured concurrency: a server that has seen traffic (pools grown
        # to it); the sessions this opens are reported apart ("including warm-up").
        concurrent_queries(clients[target.variant], target.database_id, 1)
    # PostgreSQL 15 reports a live backend's session within ~10 s of it going idle: let the
    # warm-up's sessions reach the counter first (terminating them would test reconnects).
    time.sleep(11)
    before = {t.dbname: sessions_opened(t.dbname) for t in targets}
    logins_before = {name: b.logins() for name, b in bastions_of(targets).items()}
    order = random.Random(seed)
    for block in range(scale.blocks):
        for case in order.sample(CASES, len(CASES)):
            pair = {t.variant: t for t in targets if t.case == case}
            for name, (client, own) in sequential_pairs(
                servers, clients, pair, scale, order
            ).items():
                samples.setdefault(f"{name} {case} sequential", []).extend(client)
                served.setdefault(f"{name} {case} sequential", []).extend(own)
                counted[f"{name} {case}"] = counted.get(f"{name} {case}", 0) + scale.sequential
        for target in order.sample(targets, len(targets)):
            key = f"{target.variant} {target.case}"
            latencies, qps = concurrent_queries(
                clients[target.variant], target.database_id, scale.concurrent
            )
            samples.setdefault(f"{key} concurrent", []).extend(latencies)
            throughput.setdefault(f"{key} concurrent", []).append(qps)
            counted[key] = counted.get(key, 0) + CONCURRENCY * scale.concurrent
        print(f"block {block + 1}/{scale.blocks} done", file=sys.stderr, flush=True)
    for batch in clients.values():
        for client in batch:
            client.close()
    settled = {t.dbname: settled_sessions(t.dbname) for t in targets}
    sessions = {f"{t.variant} {t.case}": settled[t.dbname] - before[t.dbname] for t in targets}
    whole_run = {f"{t.variant} {t.case}": settled[t.dbname] for t in targets}
    logins = {f"{name} ssh": b.logins() - logins_before[name]
              for name, b in bastions_of(targets).items()}
    return report(samples, throughput, counted, sessions, logins, scale, served, whole_run)


def sequential_pairs(
    servers: dict[str, Server],
    clients: dict[str, list[SupersetClient]],
    pair: dict[str, Target],
    scale: Scale,
    order: random.Random,
) -> dict[str, tuple[list[float], list[float]]]:
    """``scale.sequential`` rounds of one query per server, in a shuffled order per round.

    Query by query, so a load swing on this shared machine hits both servers alike (blocks of
    40 queries per server let a swing between them decide the ratio). A pause of ``PAUSE`` s
    before each query (a user's think time, untimed) lets what a query leaves behind end first
    (stock's PostgreSQL backend and sshd session exiting, its tunnel thread): with queries back
    to back it would land on the next query, the other server's as often as its own. Per
    server: the client's latencies and, from gunicorn's access log, the server's own time for
    the same requests (the difference is HTTP and the client, alike for both).
    """
    logs = {name: servers[name].process.log for name in pair}
    marks = {name: len(served_times(log)) for name, log in logs.items()}
    latencies: dict[str, list[float]] = {name: [] for name in pair}
    names = list(pair)
    for _ in range(scale.sequential):
        order.shuffle(names)
        for name in names:
            time.sleep(PAUSE)
            latencies[name].append(timed_query(clients[name][0], pair[name].database_id))
    # gunicorn writes the access line after the response: wait for the last one.
    for name, log in logs.items():
        wanted = marks[name] + scale.sequential
        wait_for(lambda log=log, wanted=wanted: len(served_times(log)) >= wanted,
                 30, f"{name}'s access log")
    return {
        name: (latencies[name], served_times(log)[marks[name]:marks[name] + scale.sequential])
        for name, log in logs.items()
    }


def bastions_of(targets: list[Target]) -> dict[str, LoggingSshd]:
    return {t.variant: t.bastion for t in targets if t.bastion is not None}


def report(
    samples: dict[str, list[float]],
    throughput: dict[str, list[float]],
    counted: dict[str, int],
    sessions: dict[str, int],
    logins: dict[str, int],
    scale: Scale,
    served: dict[str, list[float]],
    whole_run: dict[str, int],
) -> dict[str, Any]:
    stats = {key: summary(values) for key, values in samples.items()}
    server_stats = {key: summary(values) for key, values in served.items()}
    per_1000 = {
        key: {
            "queries": counted[key],
            "new_sessions": sessions[key],
            "new_sessions_including_warmup": whole_run[key],
            "new_sessions_per_1000": 1000 * sessions[key] / counted[key],
            "ssh_logins_per_1000": 1000 * logins.get(key, 0) / counted[key],
        }
        for key in counted
    }
    qps = {key: sum(v) / len(v) for key, v in throughput.items()}
    ratios = {}
    goals = {"direct": 0.9, "ssh": 0.4}
    for case in CASES:
        for kind in ("sequential", "concurrent"):
            ours = stats[f"enginehouse {case} {kind}"]
            stock = stats[f"stock {case} {kind}"]
            ratio = ours["p50"] / stock["p50"]
            ratios[f"{case} {kind} p50"] = {
                "enginehouse": ours["p50"], "stock": stock["p50"], "ratio": ratio,
                "paired": _paired(samples, served, case) if kind == "sequential" else None,
                "goal": goals[case] if kind == "sequential" else None,
                "met": ratio <= goals[case] if kind == "sequential" else None,
            }
        ratios[f"{case} concurrent q/s"] = {
            "enginehouse": qps[f"enginehouse {case} concurrent"],
            "stock": qps[f"stock {case} concurrent"],
            "ratio": qps[f"enginehouse {case} concurrent"] / qps[f"stock {case} concurrent"],
            "goal": None, "met": None,
        }
    sessions_goal = {
        key: value["new_sessions_per_1000"] <= 10
        for key, value in per_1000.items() if key.startswith("enginehouse")
    }
    return {
        "name": "superset",
        "when": utc_now(),
        "scale": scale.__dict__,
        "settings": {"workers": 2, "worker_class": "gthread", "threads": 4,
                     "concurrency": CONCURRENCY, "sql": SQL, "ssh_key": "RSA 2048",
                     "sequential": f"interleaved query by query, {PAUSE:g} s pause before each",
                     "mode": "singleton"},
        "machine": machine_info(),
        "latency": stats,
        "server_time": server_stats,
        "throughput": qps,
        "per_1000_queries": per_1000,
        "ratios": ratios,
        "sessions_goal_met": sessions_goal,
        "samples": samples,
        "server_samples": served,
        "keepalive_retries": len(RETRIED),
    }


def _paired(
    samples: dict[str, list[float]], served: dict[str, list[float]], case: str
) -> dict[str, Any] | None:
    """Sequential queries ran in pairs (one per server, shuffled order): the median of the
    per-pair ratios, of the client's latency and of gunicorn's own time (access log)."""
    key = f"{case} sequential"
    ours, stock = samples.get(f"enginehouse {key}", []), samples.get(f"stock {key}", [])
    ours_served = served.get(f"enginehouse {key}", [])
    stock_served = served.get(f"stock {key}", [])
    if not ours or len(ours) != len(stock) or len(ours_served) != len(stock_served):
        return None
    return {
        "median_ratio": paired_ratio(ours, stock),
        "server_p50_ratio": (statistics.median(ours_served) / statistics.median(stock_served)
                             if ours_served else None),
        "server_median_ratio": paired_ratio(ours_served, stock_served) if ours_served else None,
    }


def _sessions(per: dict[str, Any]) -> str:
    """"N in Q queries, M with the warm-up" (older results lack the counts)."""
    if "new_sessions" not in per:
        return "-"
    return (f"{per['new_sessions']} in {per['queries']}, "
            f"{per['new_sessions_including_warmup']} with warm-up")


def table(result: dict[str, Any]) -> str:
    lines = ["| case | server | p50 | p90 | p99 | gunicorn's p50 | q/s (8 clients) | "
             "new sessions / 1k | SSH logins / 1k |", "|---|---|---|---|---|---|---|---|---|"]
    for case in CASES:
        for kind in ("sequential", "concurrent"):
            for variant in VARIANTS:
                s = result["latency"][f"{variant} {case} {kind}"]
                per = result["per_1000_queries"][f"{variant} {case}"]
                qps = result["throughput"][f"{variant} {case} concurrent"]
                served = result.get("server_time", {}).get(f"{variant} {case} {kind}")
                own = "-" if served is None else f"{served['p50'] * 1e3:.0f} ms"
                lines.append(
                    f"| {case}, {kind} | {variant} | {s['p50'] * 1e3:.0f} ms | "
                    f"{s['p90'] * 1e3:.0f} ms | {s['p99'] * 1e3:.0f} ms | {own} | "
                    f"{qps:.1f} | {per['new_sessions_per_1000']:.1f} ({_sessions(per)}) | "
                    f"{per['ssh_logins_per_1000']:.1f} |"
                )
    retried = result.get("keepalive_retries")
    if retried:
        lines += ["", f"{retried} queries sent again after a keep-alive race (see timed_query)"]
    lines += ["", "| ratio (enginehouse / stock) | value | goal | met |", "|---|---|---|---|"]
    for label, r in result["ratios"].items():
        goal = "-" if r["goal"] is None else f"<= {r['goal']}x"
        met = {None: "-", True: "yes", False: "NO"}[r["met"]]
        paired = r.get("paired")
        value = f"{r['ratio']:.2f}x"
        if paired:
            value += f" (median of paired ratios {paired['median_ratio']:.2f}x"
            if paired.get("server_p50_ratio") is not None:
                value += f"; server time p50 {paired['server_p50_ratio']:.2f}x"
            value += ")"
        lines.append(f"| {label} | {value} | {goal} | {met} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """p50 per case (bars, log scale) and new sessions / SSH logins per 1,000 queries."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    labels = [f"{c}\n{k}" for c in CASES for k in ("sequential", "concurrent")]
    width = 0.38
    for index, variant in enumerate(VARIANTS):
        values = [result["latency"][f"{variant} {c} {k}"]["p50"] * 1e3
                  for c in CASES for k in ("sequential", "concurrent")]
        xs = [i + (index - 0.5) * width for i in range(len(labels))]
        bars = left.bar(xs, values, width, label=variant)
        left.bar_label(bars, labels=[f"{v:.0f}" for v in values], padding=2, fontsize=8)
    left.set_xticks(range(len(labels)), labels)
    left.set_ylabel("SQL Lab SELECT 1, p50 latency (ms)")
    left.set_title("latency through Superset's REST API", fontsize=10)
    left.legend(frameon=False, fontsize=9)
    left.grid(axis="y", alpha=0.3)
    groups = ["new sessions\ndirect", "new sessions\nssh", "SSH logins\nssh"]
    for index, variant in enumerate(VARIANTS):
        per = result["per_1000_queries"]
        values = [per[f"{variant} direct"]["new_sessions_per_1000"],
                  per[f"{variant} ssh"]["new_sessions_per_1000"],
                  per[f"{variant} ssh"]["ssh_logins_per_1000"]]
        xs = [i + (index - 0.5) * width for i in range(len(groups))]
        bars = right.bar(xs, values, width, label=variant)
        right.bar_label(bars, labels=[f"{v:.0f}" for v in values], padding=2, fontsize=8)
    right.set_xticks(range(len(groups)), groups)
    right.set_ylabel("per 1,000 queries")
    right.set_title("connections opened (seen from PostgreSQL and sshd)", fontsize=10)
    right.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Superset 6.1.0: stock vs enginehouse SINGLETON ({result['when']})",
                 fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run; no plot")
    parser.add_argument("--full", action="store_true", help="the full run (the default)")
    parser.add_argument("--blocks", type=int, help="alternating blocks (default 6)")
    parser.add_argument("--replot", type=Path, help="redraw the plot from a results JSON")
    parser.add_argument("--plot", type=Path, default=PLOTS_DIR / "superset.png")
    args = parser.parse_args(argv)
    if args.replot:
        import json

        result = json.loads(args.replot.read_text())
    else:
        scale = QUICK if args.quick else Scale()
        if args.blocks:
            scale = Scale(blocks=args.blocks, sequential=scale.sequential,
                          concurrent=scale.concurrent, warmup=scale.warmup)
        result = run(scale)
        print(f"results: {write_results('superset', result)}")
    print(table(result))
    if not args.quick and plotting_available():
        print(f"plot: {plot(result, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
