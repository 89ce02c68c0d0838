"""FIFO hand-off: 8 threads on 2 connections, the budgeted pool vs SQLAlchemy's QueuePool.

    python -m benchmarks.bench_handoff            # full run (~1 min)
    python -m benchmarks.bench_handoff --quick    # smoke run (~10 s)

A capped database's pool (``BudgetedQueuePool``) hands a returned connection
to the longest waiter; SQLAlchemy's ``QueuePool`` lets whoever asks next take
it, usually the thread that just returned it. Same load for both: 8 threads,
each in a loop (check out, timed: the *wait*; query; check in) for
``--seconds``, on 2 connections: ``EngineManager()`` on its defaults with
``extra.max_connections = 2`` against a bare ``create_engine(pool_size=2,
max_overflow=0)``. Queries: ``SELECT 1`` and ``SELECT pg_sleep(0.005)``;
alternatives interleaved, ``--repeats`` rounds. Reported per alternative:
queries/s, the fewest and most queries one thread made (fairness) and the
longest single wait.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

if not __package__:  # run as a script (python benchmarks/bench_handoff.py): find the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import PG_URI, machine_info, utc_now, write_results
from enginehouse import DatabaseSpec, EngineManager

THREADS = 8
CONNECTIONS = 2
QUERIES = ("SELECT 1", "SELECT pg_sleep(0.005)")
HANDOFF, QUEUEPOOL = "budgeted pool (FIFO hand-off)", "SQLAlchemy QueuePool"


def load(engine: Engine, query: str, seconds: float) -> dict[str, Any]:
    """THREADS threads in a loop on ``engine`` for ``seconds``: queries per thread, longest wait."""
    counts: list[int] = []
    longest: list[float] = []
    start = threading.Event()
    deadline = 0.0

    def loop() -> None:
        statement, done, worst = text(query), 0, 0.0
        start.wait()
        clock = time.perf_counter
        while clock() < deadline:
            asked = clock()
            with engine.connect() as connection:
                worst = max(worst, clock() - asked)
                connection.execute(statement)
            done += 1
        counts.append(done)
        longest.append(worst)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    deadline = time.perf_counter() + seconds
    start.set()
    for thread in threads:
        thread.join(seconds + 60)
    return {"qps": sum(counts) / seconds, "per_thread": sorted(counts),
            "longest_wait": max(longest)}


def run(seconds: float, repeats: int) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    with EngineManager() as manager:  # defaults
        database = DatabaseSpec(id="bench-handoff", uri=PG_URI,
                                extra={"max_connections": CONNECTIONS})
        engines = {
            HANDOFF: manager.get(database),
            QUEUEPOOL: create_engine(PG_URI, pool_size=CONNECTIONS, max_overflow=0),
        }
        for index in range(repeats):
            for query in QUERIES:
                order = (HANDOFF, QUEUEPOOL) if index % 2 == 0 else (QUEUEPOOL, HANDOFF)
                for alternative in order:
                    result = {"alternative": alternative, "query": query,
                              **load(engines[alternative], query, seconds)}
                    print(f"  {query}, {alternative}: {result['qps']:,.0f} q/s, per thread "
                          f"{result['per_thread'][0]}-{result['per_thread'][-1]}, longest wait "
                          f"{result['longest_wait']:.3f} s", flush=True)
                    results.append(result)
        engines[QUEUEPOOL].dispose()
    params = {"threads": THREADS, "connections": CONNECTIONS, "seconds": seconds,
              "repeats": repeats}
    return {"params": params, "results": results}


def report(data: dict[str, Any]) -> str:
    lines = ["| query | alternative | q/s (median) | queries per thread, min-max | longest wait |",
             "| --- | --- | ---: | ---: | ---: |"]
    for query in QUERIES:
        for alternative in (HANDOFF, QUEUEPOOL):
            mine = [r for r in data["results"]
                    if r["query"] == query and r["alternative"] == alternative]
            qps = sorted(r["qps"] for r in mine)[len(mine) // 2]
            low = min(r["per_thread"][0] for r in mine)
            high = max(r["per_thread"][-1] for r in mine)
            worst = max(r["longest_wait"] for r in mine)
            lines.append(f"| `{query}` | {alternative} | {qps:,.0f} | {low:,}-{high:,} | "
                         f"{worst:.3f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--seconds", type=float, default=None, help="length of one load")
    parser.add_argument("--repeats", type=int, default=None, help="rounds")
    args = parser.parse_args(argv)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    repeats = args.repeats or (1 if args.quick else 3)
    print(f"bench_handoff: {utc_now()}", flush=True)
    data = run(seconds, repeats)
    data.update(machine=machine_info(), when=utc_now())
    print(report(data))
    print(f"results: {write_results('handoff', data)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
