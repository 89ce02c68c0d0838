"""Shared helpers for the benchmarks: interleaved timing, ratios, tables, JSON, plots.

The machine is shared and noisy, so absolute times mean little. Every
benchmark runs its alternatives interleaved (each once per round, in a
shuffled order), repeats, and reports medians and ratios measured in the
same run.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from enginehouse.compat import postgres_uri

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
"""Where raw results go as JSON (gitignored)."""
PLOTS_DIR = ROOT / "docs" / "img"
PG_URI = os.environ.get("ENGINEHOUSE_BENCH_PG", postgres_uri("postgres@127.0.0.1:5432/test"))
"""The benchmarks' PostgreSQL, with this stack's driver (psycopg 3 or psycopg2)."""
PG_DSN = "postgresql://" + PG_URI.split("://", 1)[1]
"""The same database as a libpq DSN, for samplers that connect without SQLAlchemy."""
"""Where full runs put their PNG plots (committed, shown in docs/benchmarks.md)."""


# -- statistics -----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, min, p50, p90, p99, max and mean of ``values``."""
    return {
        "n": float(len(values)),
        "min": min(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of per-round ratios: samples of one round ran side by side, so noise cancels."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("paired_ratio needs two equally long, non-empty series")
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


# -- timing ---------------------------------------------------------------------


def interleave(
    alternatives: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    batch: Mapping[str, int] | int = 1,
    warmup: int = 1,
    between: Callable[[], object] | None = None,
    seed: int = 1,
) -> dict[str, list[float]]:
    """Time each alternative once per round, in a shuffled order; seconds per call.

    The order is shuffled (seeded, so reproducible) rather than rotated: in a
    rotation of three or more, one alternative always runs right after a
    given other, and whatever that one leaves warm (a server process, a
    pooled connection, CPU caches) would favour it every time.

    ``batch`` calls are timed together (per alternative if a mapping) so that
    sub-microsecond calls are not dwarfed by the clock itself; the sample is
    the batch time divided by ``batch``. ``between`` runs after each round,
    untimed (clean-up such as disposing engines a round created).
    """
    names = list(alternatives)
    sizes = {n: batch[n] if isinstance(batch, Mapping) else batch for n in names}
    for _ in range(warmup):
        for name in names:
            _run_batch(alternatives[name], sizes[name])
    if between is not None:
        between()
    samples: dict[str, list[float]] = {name: [] for name in names}
    order = list(names)
    shuffle = random.Random(seed).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            samples[name].append(_run_batch(alternatives[name], sizes[name]) / sizes[name])
        if between is not None:
            between()
    return samples


def _run_batch(call: Callable[[], object], size: int) -> float:
    clock = time.perf_counter
    start = clock()
    for _ in range(size):
        call()
    return clock() - start


# -- server-side sampling -----------------------------------------------------------


class ConnectionSampler:
    """``(time, count)`` of one application_name's connections in pg_stat_activity.

    Samples every ``every`` s in a thread of its own, between ``with`` and its
    end (a short pause leaves the 2 cores to the load; a tight loop takes
    one). ``peak`` is the largest count seen; :meth:`now` counts once.
    """

    _SQL = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"

    def __init__(self, application_name: str, dsn: str, *, every: float = 0.003) -> None:
        self.application_name = application_name
        self.points: list[tuple[float, int]] = []
        self._dsn = dsn
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-sampler", daemon=True)

    @property
    def samples(self) -> list[int]:
        return [n for _, n in self.points]

    @property
    def peak(self) -> int:
        return max((n for _, n in self.points), default=0)

    def count(self, connection: Any) -> int:
        row = connection.execute(self._SQL, (self.application_name,)).fetchone()
        assert row is not None  # count(*) always answers a row
        return int(row[0])

    def now(self) -> int:
        """One count, on a connection of its own (no thread needed)."""
        with self._connect() as connection:
            return self.count(connection)

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self._dsn, autocommit=True)

    def _run(self) -> None:
        with self._connect() as connection:
            while not self._stop.is_set():
                self.points.append((time.monotonic(), self.count(connection)))
                self._stop.wait(self._every)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=20)


# -- results --------------------------------------------------------------------


@dataclass(frozen=True)
class Ratio:
    """One line of a results table: how many times ``candidate`` beats ``baseline``.

    ``value`` > 1 means the candidate is better (faster, or more throughput),
    whatever the unit; ``goal`` is the minimum ``value`` wanted, if any.
    """

    label: str
    candidate: str
    baseline: str
    candidate_value: float
    baseline_value: float
    unit: str  # "s" (per operation, lower is better) or "q/s" (higher is better)
    value: float
    goal: float | None = None
    goal_text: str = ""

    @property
    def met(self) -> bool | None:
        return None if self.goal is None else self.value >= self.goal


@dataclass
class Result:
    """What one benchmark function returns: raw samples, and the ratios derived."""

    name: str
    ratios: list[Ratio]
    samples: dict[str, list[float]] = field(default_factory=dict)  # seconds per operation
    throughput: dict[str, list[float]] = field(default_factory=dict)  # operations per second
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.params,
            "ratios": [{**asdict(r), "met": r.met} for r in self.ratios],
            "summary": {k: summary(v) for k, v in self.samples.items() if v},
            "throughput": self.throughput,
            "samples": self.samples,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Result:
        """The inverse of :meth:`to_json` (to plot again from a results file)."""
        ratios = [Ratio(**{k: v for k, v in r.items() if k != "met"}) for r in data["ratios"]]
        return cls(
            data["name"],
            ratios,
            samples=dict(data["samples"]),
            throughput=dict(data["throughput"]),
            params=dict(data["params"]),
        )


def format_value(value: float, unit: str) -> str:
    """``1.7 us``, ``312 us``, ``2.41 ms``, ``3,120 q/s``."""
    if unit != "s":
        return f"{value:,.0f} {unit}"
    for scale, suffix in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if value >= scale or suffix == "us":
            scaled = value / scale
            digits = 0 if scaled >= 100 else 1 if scaled >= 10 else 2
            return f"{scaled:.{digits}f} {suffix}"
    raise AssertionError("unreachable")


def format_table(ratios: Sequence[Ratio]) -> str:
    """A plain-text table (also valid Markdown) of ratios, goals and verdicts."""
    header = ["measure", "candidate", "baseline", "ratio", "goal", "met"]
    rows = [
        [
            r.label,
            f"{r.candidate}: {format_value(r.candidate_value, r.unit)}",
            f"{r.baseline}: {format_value(r.baseline_value, r.unit)}",
            f"{r.value:.2f}x",
            r.goal_text or "-",
            {None: "-", True: "yes", False: "NO"}[r.met],
        ]
        for r in ratios
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), separator, *(line(row) for row in rows)])


def machine_info() -> dict[str, Any]:
    """Enough about the machine and versions to read a result file later."""
    versions: dict[str, str | None] = {}
    for name in ("SQLAlchemy", "pykka", "psycopg", "pydantic", "matplotlib"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": versions,
    }


def write_results(name: str, payload: Mapping[str, Any], directory: Path = RESULTS_DIR) -> Path:
    """Write ``payload`` to ``<directory>/<name>-<UTC time>.json`` and ``<name>-latest.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(payload, indent=1, default=str)
    path = directory / f"{name}-{stamp}.json"
    path.write_text(text)
    (directory / f"{name}-latest.json").write_text(text)
    return path


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# -- plots ----------------------------------------------------------------------


def plotting_available() -> bool:
    """True when matplotlib is installed (``pip install -e '.[bench]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
    except ImportError:
        return False
    return True


def plot_latencies(
    samples: Mapping[str, Sequence[float]],
    path: Path,
    *,
    title: str,
    subtitle: str = "",
    log: bool = True,
    note: str = "",
) -> Path:
    """Horizontal box plots of per-call latencies in microseconds, each median written out."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    names = list(samples)
    data = [[v * 1e6 for v in samples[n]] for n in names]
    fig, ax = plt.subplots(figsize=(8.5, 0.7 * len(names) + 1.9))
    ax.boxplot(data, whis=(5, 95), showfliers=False, widths=0.55, **_horizontal())
    ax.set_yticks(range(1, len(names) + 1), names)
    if log:
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
    scale = "log scale, " if log else ""
    ax.set_xlabel(f"time per call, µs ({scale}box = p25-p75, whiskers = p5-p95)")
    ax.set_title(f"{title}\n{subtitle}" if subtitle else title, fontsize=11)
    for row, values in enumerate(data, start=1):
        median = format_value(statistics.median(values) / 1e6, "s").replace("us", "µs")
        ax.annotate(
            f"median {median}",
            (percentile(values, 95), row),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=9,
        )
    ax.margins(x=0.25 if log else 0.15)
    ax.grid(axis="x", which="both", alpha=0.3)
    if note:
        fig.text(0.01, 0.01, note, fontsize=8, color="dimgray")
    return _save(fig, path)


def plot_groups(
    groups: Mapping[str, Mapping[str, float]],
    path: Path,
    *,
    title: str,
    ylabel: str,
    subtitle: str = "",
    note: str = "",
) -> Path:
    """Grouped bars: one group per key of ``groups``, one bar per series, values labelled."""
    import matplotlib.pyplot as plt

    group_names = list(groups)
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for index, name in enumerate(series):
        xs = [g + (index - (len(series) - 1) / 2) * width for g in range(len(group_names))]
        values = [groups[g].get(name, 0.0) for g in group_names]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=2, fontsize=9)
    ax.set_xticks(range(len(group_names)), group_names)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n{subtitle}" if subtitle else title, fontsize=11)
    top = max((v for g in groups.values() for v in g.values()), default=1.0)
    ax.set_ylim(0, top * 1.3)  # room for the legend above the tallest bar
    ax.legend(ncols=len(series), loc="upper center", fontsize=9, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    if note:
        fig.text(0.01, 0.01, note, fontsize=8, color="dimgray")
    return _save(fig, path)


def _horizontal() -> dict[str, Any]:
    # ``orientation`` arrived in matplotlib 3.10, which deprecated ``vert``.
    import matplotlib

    major, minor = (int(part) for part in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
