"""A worker process for the fleet tests and benchmark: ``python tests/fleet_worker.py CONFIG_JSON``.

``action="load"``: ``threads`` threads run ``queries`` statements each (or for
``seconds``) through ``EngineManager.connect``; prints one JSON line with the
counts. ``action="hold"``: checks out ``hold`` connections, prints ``READY``
and sleeps until killed (the SIGKILL test).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager


def main(config: dict[str, Any]) -> None:
    spec = DatabaseSpec(**config["spec"])
    with EngineManager(**config["settings"]) as manager:
        if config["action"] == "hold":
            hold(manager, spec, config["hold"])
        elif config["action"] == "phases":
            phases(manager, spec, config)
        else:
            load(manager, spec, config)


def hold(manager: EngineManager, spec: DatabaseSpec, count: int) -> None:
    engine = manager.get(spec)
    held = [engine.connect() for _ in range(count)]
    for connection in held:
        connection.execute(text("SELECT 1"))
    print("READY", flush=True)
    while True:
        time.sleep(60)


def load(manager: EngineManager, spec: DatabaseSpec, config: dict[str, Any]) -> None:
    sql = text(config.get("sql", "SELECT 1"))
    queries = config.get("queries")
    seconds = config.get("seconds")
    done: list[int] = []
    errors: list[str] = []
    start_gate = time.monotonic() + config.get("delay", 0.0)

    def run() -> None:
        count = 0
        while time.monotonic() < start_gate:
            time.sleep(0.001)
        end = time.monotonic() + seconds if seconds else None
        while (queries is None or count < queries) and (end is None or time.monotonic() < end):
            try:
                with manager.connect(spec) as connection:
                    connection.execute(sql)
                count += 1
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                if len(errors) > 1000:
                    break
                time.sleep(0.01)
        done.append(count)

    threads = [threading.Thread(target=run) for _ in range(config["threads"])]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - max(began, start_gate)
    budgets = [b.model_dump() for b in manager.stats().budgets]
    print(
        json.dumps(
            {
                "queries": sum(done),
                "errors": len(errors),
                "first_errors": errors[:3],
                "elapsed": elapsed,
                "budgets": budgets,
            }
        ),
        flush=True,
    )


def phases(manager: EngineManager, spec: DatabaseSpec, config: dict[str, Any]) -> None:
    """Benchmark mode: each phase runs ``threads`` threads from a shared start time.

    The start is a CLOCK_MONOTONIC time, the same in every process of the
    machine (``start_at``, or read from stdin after this worker printed
    READY), so the workers of one run load the database together although
    they finished importing at different times. A phase may start this
    worker late (``delay`` s: staggered process starts) and start its threads
    one by one (``ramp`` s apart: rising demand); each phase reports the
    longest a thread waited for a connection (``max_wait``) and how long
    after its start this worker's first query completed (``first``).
    """
    engine = manager.get(spec)
    with engine.connect() as connection:  # warm: the engine exists before the clock starts
        connection.execute(text("SELECT 1"))
    # Ready: the benchmark answers with the start time once every worker is ready.
    print("READY", flush=True)
    start = float(sys.stdin.readline()) if config.get("start_at") is None else config["start_at"]
    results = []
    for phase in config["phases"]:
        results.append(_phase(manager, spec, phase, start, config["threads"]))
        start += phase["seconds"] + config.get("gap", 0.5)
    budgets = [b.model_dump() for b in manager.stats().budgets]
    print(json.dumps({"phases": results, "budgets": budgets}), flush=True)


def _phase(
    manager: EngineManager, spec: DatabaseSpec, phase: dict[str, Any], start: float, threads: int
) -> dict[str, Any]:
    sql = text(phase["sql"])
    end = start + phase["seconds"]
    begin = start + phase.get("delay", 0.0)
    counts: list[int] = []
    errors: list[str] = []
    waits: list[float] = [0.0]
    firsts: list[float] = []

    def run(index: int) -> None:
        count, longest = 0, 0.0
        time.sleep(max(0.0, begin + index * phase.get("ramp", 0.0) - time.monotonic()))
        while time.monotonic() < end:
            asked = time.monotonic()
            try:
                with manager.connect(spec) as connection:
                    longest = max(longest, time.monotonic() - asked)
                    connection.execute(sql)
                count += 1
                if count == 1:
                    firsts.append(time.monotonic() - begin)
            except Exception as exc:
                longest = max(longest, time.monotonic() - asked)
                errors.append(f"{type(exc).__name__}: {exc}")
        counts.append(count)
        waits.append(longest)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {
        "queries": sum(counts), "seconds": phase["seconds"], "errors": len(errors),
        "first_errors": errors[:3], "late": time.monotonic() > end + 5,
        "max_wait": max(waits), "first": min(firsts, default=None),
    }


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
