"""enginehouse's own telemetry on real runs: the pictures of docs/metrics.md and docs/operations.md.

Two scenarios against the real PostgreSQL, each sampled from outside the code under load:

* ``workers``: two worker processes (as gunicorn or Celery would fork them), each with its own
  manager and pool (pool_size 2, max_overflow 2, 4 threads of 20 ms queries), metrics in
  prometheus_client's multiprocess mode. A third process scrapes ``registry_for()`` every
  0.2 s: the sums across workers of ``enginehouse_pool_active_connections``,
  ``_open_connections``, ``_max_connections`` and ``_pending``. Worker B starts 4 s after A;
  A exits at 12 s and ``mark_process_dead`` (what ``child_exit`` does) takes its live gauges
  out of the sums: no stale series.
* ``leaks``: one manager with ``leak_detection_threshold=1`` s; 3 threads of short
  ``DASHBOARD`` queries, and one ``SQL_LAB`` caller that keeps a connection 5 s from t=3 s. The
  script samples ``stats().long_holders`` and the ``enginehouse_connection_leaks_total`` and
  ``..._long_holders`` series every 0.1 s and catches the WARNING the manager logs.

Defaults everywhere but the two settings named above (the leak threshold is off by default;
pool sizes are small so that a 20 s run shows waits).

    python -m benchmarks.observe               # both; JSON to benchmarks/results, PNGs to docs/img
    python -m benchmarks.observe --quick       # shorter runs, no plots
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PG_URI,
    PLOTS_DIR,
    machine_info,
    plotting_available,
    utc_now,
    write_results,
)

DATABASE = "1701"
POOL = {"engine_params": {"pool_size": 2, "max_overflow": 2}}

WORKER = f"""
import sys, threading, time
from sqlalchemy import text
from enginehouse import DatabaseSpec, EngineManager
from enginehouse.integrations.metrics import enable_pool_events

enable_pool_events()
spec = DatabaseSpec(id={DATABASE}, uri={PG_URI!r}, extra={POOL!r})
stop = threading.Event()

def load(manager):
    while not stop.is_set():
        with manager.connect(spec) as connection:
            connection.execute(text("SELECT pg_sleep(0.02)"))
        time.sleep(0.005)

with EngineManager() as manager:
    threads = [threading.Thread(target=load, args=(manager,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    print("running", flush=True)
    sys.stdin.readline()
    stop.set()
    for thread in threads:
        thread.join()
print("done", flush=True)
"""

SERIES = ("active_connections", "open_connections", "max_connections", "pending")


# -- workers ----------------------------------------------------------------------------------


class Worker:
    """A worker process with its own manager and load, until told to stop."""

    def __init__(self, directory: str) -> None:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "running":
            raise RuntimeError("worker did not start")

    def stop(self) -> int:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        self.process.stdout.readline()
        self.process.wait(60)
        return self.process.pid


def scrape(registry: Any) -> dict[str, float]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.labels.get("database") == DATABASE:
                values[sample.name] = sample.value
    return values


def run_workers(duration: float) -> dict[str, Any]:
    """A runs from the start, B from 20% of the run; A is told to exit at 60% (then marked
    dead, as ``child_exit`` does); sampling never stops while workers start or stop."""
    directory = tempfile.mkdtemp(prefix="enginehouse-observe-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # before prometheus_client is imported
    from enginehouse import EngineManager
    from enginehouse.integrations.metrics import mark_process_dead, registry_for

    events: list[tuple[float, str]] = []
    samples: list[dict[str, float]] = []
    done = threading.Event()
    started = time.monotonic()

    def life(name: str, start_at: float, stop_at: float | None) -> None:
        done.wait(start_at)
        worker = Worker(directory)  # imports first (seconds): marked once it runs
        events.append((time.monotonic() - started, f"{name} running"))
        done.wait(None if stop_at is None else max(0.0, stop_at - (time.monotonic() - started)))
        if stop_at is not None:
            events.append((time.monotonic() - started, f"{name} told to exit"))
        mark_process_dead(worker.stop())  # what child_exit does
        if stop_at is not None:
            events.append((time.monotonic() - started, f"{name} gone, marked dead"))

    lives = [threading.Thread(target=life, args=("A", 0.0, duration * 0.6)),
             threading.Thread(target=life, args=("B", duration * 0.2, None))]
    with EngineManager() as scraper:
        registry = registry_for(scraper)
        for thread in lives:
            thread.start()
        while (now := time.monotonic() - started) < duration:
            values = scrape(registry)
            samples.append({"t": now, **{s: values.get(f"enginehouse_pool_{s}", 0.0)
                                         for s in SERIES}})
            time.sleep(0.2)
        done.set()
        for thread in lives:
            thread.join()
        final = scrape(registry)
    return {"samples": samples, "events": sorted(events),
            "after_all_exited": {s: final.get(f"enginehouse_pool_{s}", 0.0) for s in SERIES},
            "opened_total": final.get("enginehouse_pool_connections_opened_total", 0.0)}


# -- leaks ------------------------------------------------------------------------------------


class _Warnings(logging.Handler):
    def __init__(self, started: float) -> None:
        super().__init__(logging.WARNING)
        self.started, self.times = started, []  # type: ignore[var-annotated]

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("connection leak suspected"):
            self.times.append(time.monotonic() - self.started)


def run_leaks(duration: float, threshold: float = 1.0, hold: float = 5.0) -> dict[str, Any]:
    from sqlalchemy import text

    from enginehouse import DatabaseSpec, EngineManager
    from enginehouse.integrations.metrics import registry_for

    spec = DatabaseSpec(id=int(DATABASE), uri=PG_URI, extra=POOL)
    stop = threading.Event()
    samples: list[dict[str, Any]] = []
    with EngineManager(leak_detection_threshold=threshold) as manager:
        registry = registry_for(manager, pool_events=False)
        started = time.monotonic()
        warnings = _Warnings(started)
        logging.getLogger("enginehouse.leaks").addHandler(warnings)

        def dashboards() -> None:
            while not stop.is_set():
                with manager.connect(spec, source="DASHBOARD") as connection:
                    connection.execute(text("SELECT pg_sleep(0.02)"))
                time.sleep(0.01)

        def forgetful_report() -> None:
            stop.wait(duration * 0.15)
            with manager.connect(spec, source="SQL_LAB") as connection:
                connection.execute(text("SELECT 1"))
                stop.wait(hold)  # the caller keeps the connection, doing nothing with it

        threads = [threading.Thread(target=dashboards) for _ in range(3)]
        threads.append(threading.Thread(target=forgetful_report))
        for thread in threads:
            thread.start()
        try:
            while (now := time.monotonic() - started) < duration:
                stats = manager.stats()
                metrics = scrape(registry)
                samples.append({
                    "t": now,
                    "holders": [{"source": h.source, "age": h.age} for h in stats.long_holders],
                    "leaks_total": metrics.get("enginehouse_connection_leaks_total", 0.0),
                    "long_holders": metrics.get("enginehouse_connection_long_holders", 0.0),
                })
                time.sleep(0.1)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            logging.getLogger("enginehouse.leaks").removeHandler(warnings)
    return {"threshold": threshold, "hold": hold, "hold_from": duration * 0.15,
            "samples": samples, "warnings_at": warnings.times}


# -- plots ------------------------------------------------------------------------------------


def plot_workers(result: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ts = [s["t"] for s in result["samples"]]
    for series, style in zip(SERIES, ("-", "-", "--", ":"), strict=True):
        ax.plot(ts, [s[series] for s in result["samples"]], style, label=f"..._{series}")
    for t, what in result["events"]:
        ax.axvline(t, color="grey", alpha=0.4)
        ax.annotate(what, (t, ax.get_ylim()[1] * 0.95), fontsize=8, rotation=90, va="top")
    ax.set_xlabel("seconds")
    ax.set_ylabel("sum across worker processes")
    ax.set_title("enginehouse_pool_* gauges, prometheus multiprocess mode, 2 workers "
                 "(pool_size 2 + overflow 2 each)", fontsize=10)
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_leaks(result: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    ts = [s["t"] for s in result["samples"]]
    ages = [max((h["age"] for h in s["holders"]), default=None) for s in result["samples"]]
    top.plot(ts, [a if a is not None else float("nan") for a in ages], label="SQL_LAB holder age")
    top.axhline(result["threshold"], color="red", linestyle="--", label="leak_detection_threshold")
    top.axvline(result["hold_from"], color="green", linestyle=":",
                label=f"SQL_LAB checkout, kept {result['hold']:g} s")
    top.set_ylim(bottom=0)
    for t in result["warnings_at"]:
        top.axvline(t, color="orange", label="WARNING logged (with the checkout's stack)")
    top.set_ylabel("stats().long_holders\nage (s)")
    top.set_xlim(0, result["samples"][-1]["t"])
    top.legend(frameon=False, fontsize=8, loc="upper left")
    top.grid(alpha=0.3)
    bottom.step(ts, [s["leaks_total"] for s in result["samples"]], where="post",
                label="enginehouse_connection_leaks_total")
    bottom.step(ts, [s["long_holders"] for s in result["samples"]], where="post",
                label="enginehouse_connection_long_holders")
    bottom.set_xlabel("seconds (3 DASHBOARD threads of 20 ms queries run throughout, unreported)")
    bottom.legend(frameon=False, fontsize=8, loc="upper left")
    bottom.grid(alpha=0.3)
    fig.suptitle("Leak detection: a connection kept 5 s, threshold 1 s", fontsize=10)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize(result: dict[str, Any]) -> str:
    workers, leaks = result["workers"], result["leaks"]
    peak = {s: max(x[s] for x in workers["samples"]) for s in SERIES}
    holders = [h for s in leaks["samples"] for h in s["holders"]]
    return "\n".join([
        f"workers: peak sums {peak}; after every worker exited {workers['after_all_exited']}; "
        f"connections opened in all {workers['opened_total']:.0f}",
        f"leaks: warnings at {[round(t, 2) for t in leaks['warnings_at']]} s "
        f"(hold from {leaks['hold_from']:.1f} s, threshold {leaks['threshold']} s); "
        f"long holders seen: {sorted({h['source'] for h in holders})}; "
        f"leaks_total at the end {leaks['samples'][-1]['leaks_total']:.0f}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs; no plots")
    args = parser.parse_args(argv)
    duration = 8.0 if args.quick else 24.0
    result: dict[str, Any] = {"name": "observe", "when": utc_now(), "machine": machine_info(),
              "leaks": run_leaks(duration), "workers": run_workers(duration)}
    print(f"results: {write_results('observe', result)}")
    print(summarize(result))
    if not args.quick and plotting_available():
        print(f"plot: {plot_workers(result['workers'], PLOTS_DIR / 'metrics_workers.png')}")
        print(f"plot: {plot_leaks(result['leaks'], PLOTS_DIR / 'leaks.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
