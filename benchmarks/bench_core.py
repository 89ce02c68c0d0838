"""Core benchmarks (issues 3, 14): hit path, SINGLETON vs NEW, facade overhead, a miss.

    python -m benchmarks.bench_core            # full run (~8 min, callgrind too), plots: docs/img
    python -m benchmarks.bench_core --quick    # smoke run (< 20 s), no plots unless --plots
    python -m benchmarks.bench_core --instructions 0   # full run without the callgrind counts
    python -m benchmarks.bench_core --replot benchmarks/results/core-latest.json

Every figure is a ratio between alternatives measured side by side in this
one run (interleaved, repeated, medians): see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pykka
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from benchmarks.common import (
    PG_URI,
    PLOTS_DIR,
    ROOT,
    Ratio,
    Result,
    format_table,
    interleave,
    machine_info,
    paired_ratio,
    plot_groups,
    plot_latencies,
    plotting_available,
    utc_now,
    write_results,
)
from enginehouse import DatabaseSpec, EngineManager
from enginehouse.default import DefaultEngines
from enginehouse.plan import build_plan, request_key

POOL_SIZE = 8
"""Pool sized for the 8-thread run, so no thread waits on an overflow connection."""
SELECT_1 = text("select 1")

HIT_GOAL = 15.0  # cached get() vs create_engine()
ASK_GOAL = 10.0  # cached get() vs one pykka ask round trip
FACADE_OVERHEAD_GOAL = 0.03  # connect() through the facade vs its engine used bare (issue 14)


@dataclass(frozen=True)
class Scale:
    """How long each benchmark runs: full or quick."""

    hit_rounds: int
    facade_rounds: int
    miss_rounds: int
    miss_batch: int
    mode_seconds: float
    mode_repeats: int
    facade_batch: int = 20
    instruction_queries: int = 0  # 0: no callgrind run


FULL = Scale(
    hit_rounds=1000, facade_rounds=400, miss_rounds=60, miss_batch=10, mode_seconds=0.5,
    mode_repeats=18, facade_batch=20, instruction_queries=500,
)
QUICK = Scale(
    hit_rounds=40, facade_rounds=20, miss_rounds=8, miss_batch=5, mode_seconds=0.6,
    mode_repeats=1, facade_batch=5,
)


def database(uri: str = PG_URI, database_id: int | str = "bench") -> DatabaseSpec:
    """The database every core benchmark talks to (a QueuePool of ``POOL_SIZE``)."""
    return DatabaseSpec(
        id=database_id, uri=uri, extra={"engine_params": {"pool_size": POOL_SIZE}}
    )


class Echo(pykka.ThreadingActor):
    """The cheapest possible actor: answers every ask with the message itself."""

    use_daemon_thread = True

    def on_receive(self, message: Any) -> Any:
        return message


# -- 1. the hit path ------------------------------------------------------------------


def bench_hit_path(
    spec: DatabaseSpec, *, rounds: int, default: DefaultEngines | None = None
) -> Result:
    """Cached ``get()`` (a manager, the default ``engines``) vs ``create_engine`` and an ask."""
    default = default if default is not None else _default_engines()
    default.configure(mode="singleton")
    url = spec.sqlalchemy_url()
    params = spec.engine_params
    echo = Echo.start()
    try:
        with EngineManager(mode="singleton") as manager:
            manager.get(spec)
            default.get(spec)
            samples = interleave(
                {
                    "manager.get() hit": lambda: manager.get(spec),
                    "engines.get() hit": lambda: default.get(spec),
                    "pykka ask round trip": lambda: echo.ask(1, timeout=10),
                    "create_engine()": lambda: create_engine(url, **params),
                },
                rounds=rounds,
                batch={
                    "manager.get() hit": 200,
                    "engines.get() hit": 200,
                    "pykka ask round trip": 10,
                    "create_engine()": 3,
                },
            )
    finally:
        echo.stop()
        default.shutdown()
    hit, default_hit = samples["manager.get() hit"], samples["engines.get() hit"]
    ask, create = samples["pykka ask round trip"], samples["create_engine()"]
    ratios = [
        _faster("hit vs create_engine", "get()", hit, "create_engine()", create, HIT_GOAL),
        _faster("hit vs pykka ask", "get()", hit, "ask", ask, ASK_GOAL),
        _faster(
            "default hit vs create_engine",
            "engines.get()",
            default_hit,
            "create_engine()",
            create,
            HIT_GOAL,
        ),
        _faster("default hit vs pykka ask", "engines.get()", default_hit, "ask", ask, ASK_GOAL),
    ]
    return Result("hit_path", ratios, samples=samples, params={"rounds": rounds})


def _default_engines() -> DefaultEngines:
    from enginehouse import engines

    return engines


# -- 2. SINGLETON vs NEW ------------------------------------------------------------


def bench_modes(
    spec: DatabaseSpec,
    *,
    seconds: float,
    repeats: int,
    thread_counts: Sequence[int] = (1, 8),
) -> Result:
    """SELECT 1 throughput, runs alternated: SINGLETON vs NEW, and two bare-engine references.

    NEW builds a new engine per ``get()``, so each query also pays SQLAlchemy's
    first-connect dialect initialisation; the references (one bare QueuePool
    engine vs one bare NullPool engine) isolate pooling alone.
    """
    throughput: dict[str, list[float]] = {}
    url, params = spec.sqlalchemy_url(), spec.engine_params
    queue_engine = create_engine(url, **params)
    null_engine = create_engine(url, poolclass=NullPool)
    try:
        with (
            EngineManager(mode="singleton") as singleton,
            EngineManager(mode="new") as new,
        ):
            ways: dict[str, Callable[[], Any]] = {
                "SINGLETON": lambda: singleton.connect(spec),
                "NEW": lambda: new.connect(spec),
                "bare QueuePool": queue_engine.connect,
                "bare NullPool": null_engine.connect,
            }
            order = list(ways)
            shuffle = random.Random(1).shuffle
            for threads in thread_counts:
                for _ in range(repeats):
                    # Shuffled, not rotated: a NullPool run leaves server processes
                    # exiting, and whichever run always came next would pay for them.
                    shuffle(order)
                    for way in order:
                        rate = _throughput(ways[way], threads=threads, seconds=seconds)
                        throughput.setdefault(f"{way} {threads}t", []).append(rate)
                        _settle()
    finally:
        queue_engine.dispose()
        null_engine.dispose()
    ratios = []
    for threads in thread_counts:
        count = _threads(threads)
        ratios += [
            _more(throughput, threads, f"SINGLETON vs NEW, {count}", "SINGLETON", "NEW"),
            _more(
                throughput,
                threads,
                f"reference: QueuePool vs NullPool engine, {count}",
                "bare QueuePool",
                "bare NullPool",
            ),
            _more(
                throughput,
                threads,
                f"SINGLETON vs bare QueuePool, {count}",
                "SINGLETON",
                "bare QueuePool",
            ),
        ]
    params = {"seconds": seconds, "repeats": repeats, "threads": list(thread_counts)}
    return Result("modes", ratios, throughput=throughput, params=params)


def _more(
    throughput: dict[str, list[float]], threads: int, label: str, candidate: str, baseline: str
) -> Ratio:
    """How many times the queries per second of ``candidate`` those of ``baseline``."""
    high, low = throughput[f"{candidate} {threads}t"], throughput[f"{baseline} {threads}t"]
    goal_text = {"NEW": "expect ~6-8x", "bare NullPool": "issue's ~6.5x (8t)"}.get(baseline, "~1x")
    return Ratio(
        label=label,
        candidate=candidate,
        baseline=baseline,
        candidate_value=_median(high),
        baseline_value=_median(low),
        unit="q/s",
        value=paired_ratio(high, low),
        goal_text=goal_text,
    )


def _settle(pause: float = 0.1) -> None:
    """Between timed runs: collect the garbage a run left, let closed server processes exit."""
    gc.collect()
    time.sleep(pause)  # a benchmark, not a test: nothing to poll, just let the machine calm down


def _throughput(
    connect: Callable[[], AbstractContextManager[Connection]], *, threads: int, seconds: float
) -> float:
    """Queries per second of ``threads`` threads doing connect + SELECT 1 for ``seconds``."""
    with connect() as connection:  # warm: driver, dialect, first connection
        connection.execute(SELECT_1)
    counts = [0] * threads
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)
    deadline = [0.0]

    def worker(slot: int) -> None:
        start.wait()
        done = 0
        try:
            while time.perf_counter() < deadline[0]:
                with connect() as connection:
                    connection.execute(SELECT_1)
                done += 1
        except BaseException as exc:  # reported below: a benchmark must not hide failures
            errors.append(exc)
        counts[slot] = done

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.wait()
    for thread in workers:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} worker(s) failed") from errors[0]
    return sum(counts) / elapsed


# -- 3. facade overhead -----------------------------------------------------------


FACADE = "manager.connect()"
DEFAULT = "engines.connect()"
GET_CONNECT = "engines.get(db).connect()"
SAME_ENGINE = "its engine, used bare"
DEFAULT_ENGINE = "engines' engine, used bare"
BARE = "bare QueuePool engine"
TWIN = "identical bare engine (A/A)"
FACADES = (FACADE, DEFAULT, GET_CONNECT)


def facade_ways(
    manager: EngineManager, default: DefaultEngines, spec: DatabaseSpec
) -> dict[str, Callable[[], None]]:
    """connect + SELECT 1 through each facade, and on the manager's own engine used bare."""
    engine = manager.get(spec)
    default_engine = default.get(spec)
    assert default_engine.pool is not engine.pool  # two managers: two pools

    def through_manager() -> None:
        with manager.connect(spec) as connection:
            connection.execute(SELECT_1)

    def through_default() -> None:
        with default.connect(spec) as connection:
            connection.execute(SELECT_1)

    def get_then_connect() -> None:
        with default.get(spec).connect() as connection:
            connection.execute(SELECT_1)

    return {
        FACADE: through_manager,
        DEFAULT: through_default,
        GET_CONNECT: get_then_connect,
        SAME_ENGINE: direct(engine),
        DEFAULT_ENGINE: direct(default_engine),
    }


def direct(target: Engine) -> Callable[[], None]:
    """connect + SELECT 1 on ``target`` itself."""

    def run() -> None:
        with target.connect() as connection:
            connection.execute(SELECT_1)

    return run


def bench_facade(
    spec: DatabaseSpec, *, rounds: int, batch: int = 20, reconnect_every: int = 10
) -> Result:
    """Blocks of ``batch`` connect + SELECT 1 through the facades vs on bare QueuePool engines.

    Every alternative runs one block per round, in a shuffled order, for
    ``rounds`` rounds; a sample is one block's time per query, and each ratio
    is the median of the per-round ratios (with a 95% confidence interval).
    The facades (``manager.connect()``, the default ``engines.connect()`` and
    ``engines.get(db).connect()``) are judged against the engine they hand
    out, used bare: it shares their pool, hence the very PostgreSQL
    connection, so the difference is the facade's code alone (the goal).
    The separately created bare engines have server connections of their
    own: an A/A pair of identical ones shows how much those differ by themselves.
    Every ``reconnect_every`` rounds all pools are emptied and warmed again
    (untimed), to spread that bias over many server processes.
    """
    bare = create_engine(spec.sqlalchemy_url(), **spec.engine_params)
    twin = create_engine(spec.sqlalchemy_url(), **spec.engine_params)
    default = DefaultEngines()  # on its defaults, like the process-wide ``engines``
    try:
        with EngineManager() as manager:  # the library's defaults
            ways = facade_ways(manager, default, spec)
            pools = [manager.get(spec), default.get(spec), bare, twin]
            finished = itertools.count(1)

            def reconnect() -> None:
                if next(finished) % reconnect_every:
                    return
                for target in pools:
                    # Pool.dispose() closes idle connections and keeps the pool
                    # usable; unlike Engine.dispose() it leaves the registry alone.
                    target.pool.dispose()
                    direct(target)()

            samples = interleave(
                {**ways, BARE: direct(bare), TWIN: direct(twin)},
                rounds=rounds,
                batch=batch,
                warmup=3,
                between=reconnect,
            )
    finally:
        default.shutdown()
        bare.dispose()
        twin.dispose()
    baseline = {FACADE: SAME_ENGINE, DEFAULT: DEFAULT_ENGINE, GET_CONNECT: DEFAULT_ENGINE}
    ratios = [
        _overhead(f"facade overhead: {way} + SELECT 1, same engine", samples, way, base, True)
        for way, base in baseline.items()
    ]
    ratios += [
        _overhead("manager.connect() vs a separate bare engine", samples, FACADE, BARE),
        _overhead("A/A: bare engine vs an identical bare engine", samples, TWIN, BARE),
    ]
    params: dict[str, Any] = {
        "rounds": rounds,
        "batch": batch,
        "reconnect_every": reconnect_every,
        "settings": "EngineManager() and DefaultEngines() on their defaults",
        "overhead": paired_ratio(samples[FACADE], samples[SAME_ENGINE]) - 1,
        "overhead_ci95": _overhead_interval(samples[FACADE], samples[SAME_ENGINE]),
        "overhead_vs_separate_engine": paired_ratio(samples[FACADE], samples[BARE]) - 1,
        "a_a_difference": paired_ratio(samples[TWIN], samples[BARE]) - 1,
    }
    for way, name in ((DEFAULT, "default"), (GET_CONNECT, "get_connect")):
        params[f"{name}_overhead"] = paired_ratio(samples[way], samples[DEFAULT_ENGINE]) - 1
        params[f"{name}_overhead_ci95"] = _overhead_interval(samples[way], samples[DEFAULT_ENGINE])
    return Result("facade", ratios, samples=samples, params=params)


def _overhead_interval(candidate: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """A 95% confidence interval of the median per-round overhead (distribution-free).

    The ranks n/2 -+ 0.98 sqrt(n) of the sorted per-round ratios bound the
    median with ~95% confidence whatever their distribution (sign test).
    """
    ratios = sorted(c / b for c, b in zip(candidate, baseline, strict=True))
    half = 0.98 * math.sqrt(len(ratios))
    low = max(0, math.floor(len(ratios) / 2 - half))
    high = min(len(ratios) - 1, math.ceil(len(ratios) / 2 + half))
    return [ratios[low] - 1, ratios[high] - 1]


def _overhead(
    label: str, samples: dict[str, list[float]], candidate: str, baseline: str, goal: bool = False
) -> Ratio:
    """``baseline`` time / ``candidate`` time: 0.95x means the candidate costs ~5% more."""
    return Ratio(
        label=label,
        candidate=candidate,
        baseline=baseline,
        candidate_value=_median(samples[candidate]),
        baseline_value=_median(samples[baseline]),
        unit="s",
        value=paired_ratio(samples[baseline], samples[candidate]),
        goal=1 / (1 + FACADE_OVERHEAD_GOAL) if goal else None,
        goal_text=f"overhead <= {FACADE_OVERHEAD_GOAL:.0%}" if goal else "report (noise)",
    )


# -- 4. instruction counts (load-independent) -----------------------------------------

INSTRUCTION_WAYS = (SAME_ENGINE, FACADE, DEFAULT, GET_CONNECT)
CHILD_ASK_TIMEOUT = 600.0
_HELPER_C = """
#include <valgrind/callgrind.h>
void enginehouse_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
"""


def bench_instructions(uri: str, *, queries: int, parallel: int = 2) -> Result | None:
    """Client-side CPU instructions per pooled connect + SELECT 1, each way in its own process.

    Each way runs under ``valgrind --tool=callgrind --collect-atstart=no``:
    the child warms up, then a client request (a 2-line C helper compiled
    here) switches collection on for exactly ``queries`` queries of the
    main thread and off again. Instruction counts do not depend on the
    machine's load, so this ratio is repeatable where the timed one is not.
    None (and a note) when valgrind, its header or a C compiler is missing.
    """
    with tempfile.TemporaryDirectory(prefix="enginehouse-callgrind-") as scratch:
        helper = _compile_helper(Path(scratch))
        if helper is None:
            return None
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            counts = dict(
                zip(
                    INSTRUCTION_WAYS,
                    pool.map(lambda way: _count(way, uri, queries, helper), INSTRUCTION_WAYS),
                    strict=True,
                )
            )
    per_query = {way: count / queries for way, count in counts.items()}
    ratios = [
        Ratio(
            label=f"instructions: {way} vs its engine used bare",
            candidate=way,
            baseline=SAME_ENGINE,
            candidate_value=per_query[way],
            baseline_value=per_query[SAME_ENGINE],
            unit="instr/query",
            value=per_query[SAME_ENGINE] / per_query[way],
            goal=1 / (1 + FACADE_OVERHEAD_GOAL),
            goal_text=f"overhead <= {FACADE_OVERHEAD_GOAL:.0%}",
        )
        for way in FACADES
    ]
    params = {
        "queries": queries,
        "per_query": per_query,
        "overhead": {way: per_query[way] / per_query[SAME_ENGINE] - 1 for way in FACADES},
        "tool": "valgrind --tool=callgrind --collect-atstart=no (client side, main thread)",
    }
    return Result("instructions", ratios, params=params)


def _compile_helper(directory: Path) -> str | None:
    """The toggle helper as a shared library, or None (and why) if it cannot be built."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if shutil.which("valgrind") is None or compiler is None:
        print("instruction counts skipped: valgrind or a C compiler not found")
        return None
    source, library = directory / "toggle.c", directory / "toggle.so"
    source.write_text(_HELPER_C)
    built = subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", "-o", str(library), str(source)],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        print(f"instruction counts skipped: helper not built ({built.stderr.strip()[:200]})")
        return None
    return str(library)


def _count(way: str, uri: str, queries: int, helper: str) -> int:
    """Instructions the main thread spent on ``queries`` queries ``way`` (one child process)."""
    command = [
        "valgrind", "--tool=callgrind", "--collect-atstart=no", "--callgrind-out-file=/dev/null",
        sys.executable, "-m", "benchmarks.bench_core", "--count-instructions", way,
        "--queries", str(queries), "--uri", uri, "--helper", helper,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    found = re.findall(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"callgrind run of {way!r} failed: {done.stderr[-2000:]}")
    return int(found[-1])


def count_child(way: str, uri: str, queries: int, helper: str) -> None:
    """In the valgrind child: warm up, then collect for exactly ``queries`` queries."""
    toggle = ctypes.CDLL(helper).enginehouse_toggle
    spec = database(uri)
    default = DefaultEngines()
    # Defaults but ask_timeout: under valgrind a first engine takes longer than 10 s to
    # build. The counted hit path never asks an actor, so the setting does not show.
    default.configure(ask_timeout=CHILD_ASK_TIMEOUT)
    try:
        with EngineManager(ask_timeout=CHILD_ASK_TIMEOUT) as manager:
            run = facade_ways(manager, default, spec)[way]
            for _ in range(100):  # statement caches, pool, dialect: all warm
                run()
            gc.collect()
            toggle()
            for _ in range(queries):
                run()
            toggle()
    finally:
        default.shutdown()


# -- 4. a miss ----------------------------------------------------------------------


def bench_miss(spec: DatabaseSpec, *, rounds: int, batch: int) -> Result:
    """First ``get()`` of a new key (plan + ask + create_engine) vs ``create_engine`` alone."""
    schemas = (f"bench_{n}" for n in itertools.count())
    with EngineManager(mode="singleton", max_engines=batch * 4) as manager:
        # The baseline builds exactly the engine a miss builds (same URL and arguments).
        sample_key = request_key(
            spec, manager.settings, catalog=None, schema="bench", user=None, source=None
        )
        plan = build_plan(spec, sample_key, manager.settings)
        made: list[Engine] = []

        def miss() -> None:
            manager.get(spec, schema=next(schemas))

        def create() -> None:
            made.append(create_engine(plan.url, **plan.kwargs))

        def clean() -> None:
            manager.dispose(spec.id)
            for engine in made:
                engine.dispose()
            made.clear()

        samples = interleave(
            {"miss: first get() of a new key": miss, "create_engine()": create},
            rounds=rounds,
            batch=batch,
            between=clean,
        )
    missed, created = samples["miss: first get() of a new key"], samples["create_engine()"]
    ratio = Ratio(
        label="miss vs create_engine (cost of a miss)",
        candidate="miss",
        baseline="create_engine()",
        candidate_value=_median(missed),
        baseline_value=_median(created),
        unit="s",
        value=paired_ratio(created, missed),
        goal_text="none (report)",
    )
    params = {"rounds": rounds, "batch": batch, "slowdown": paired_ratio(missed, created)}
    return Result("miss", [ratio], samples=samples, params=params)


# -- running ------------------------------------------------------------------------


def _faster(
    label: str,
    candidate: str,
    fast: list[float],
    baseline: str,
    slow: list[float],
    goal: float,
) -> Ratio:
    return Ratio(
        label=label,
        candidate=candidate,
        baseline=baseline,
        candidate_value=_median(fast),
        baseline_value=_median(slow),
        unit="s",
        value=paired_ratio(slow, fast),
        goal=goal,
        goal_text=f">= {goal:g}x",
    )


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def run(
    scale: Scale, spec: DatabaseSpec, *, log: Callable[[str], None] = print
) -> list[Result]:
    """Every core benchmark, in order (instruction counts only if ``scale`` asks)."""
    steps: list[tuple[str, Callable[[], Result | None]]] = [
        ("hit path", lambda: bench_hit_path(spec, rounds=scale.hit_rounds)),
        (
            "facade overhead",
            lambda: bench_facade(spec, rounds=scale.facade_rounds, batch=scale.facade_batch),
        ),
        (
            "miss",
            lambda: bench_miss(spec, rounds=scale.miss_rounds, batch=scale.miss_batch),
        ),
        (
            "SINGLETON vs NEW",
            lambda: bench_modes(spec, seconds=scale.mode_seconds, repeats=scale.mode_repeats),
        ),
    ]
    if scale.instruction_queries:
        uri = spec.sqlalchemy_url().render_as_string(hide_password=False)
        steps.append(
            (
                "instruction counts",
                lambda: bench_instructions(uri, queries=scale.instruction_queries),
            )
        )
    results = []
    for name, step in steps:
        began = time.perf_counter()
        result = step()
        if result is not None:
            results.append(result)
        log(f"  {name}: {time.perf_counter() - began:.1f} s")
    return results


def plot(results: Sequence[Result], directory: Path, *, when: str | None = None) -> list[Path]:
    """core_hit_path.png, core_throughput.png, core_connect.png into ``directory``."""
    by_name = {r.name: r for r in results}
    ratios = {r.label: r.value for result in results for r in result.ratios}
    when = when or utc_now()
    note = f"enginehouse core benchmarks, {when}, {os.cpu_count()} CPUs, shared machine"
    paths = []
    hit = by_name["hit_path"].samples
    paths.append(
        plot_latencies(
            {**hit, "miss (new key)": by_name["miss"].samples["miss: first get() of a new key"]},
            directory / "core_hit_path.png",
            title="Getting an engine: cached get() vs creating one vs an actor round trip",
            subtitle=(
                f"cached get() is {ratios['hit vs create_engine']:.0f}x faster than "
                f"create_engine(), {ratios['hit vs pykka ask']:.0f}x faster than a pykka ask"
            ),
            note=note,
        )
    )
    modes = by_name["modes"]
    threads = modes.params["threads"]
    groups = {
        _threads(t): {
            way: _median(modes.throughput[f"{way} {t}t"])
            for way in ("SINGLETON", "NEW", "bare QueuePool", "bare NullPool")
        }
        for t in threads
    }
    versus = ", ".join(f"{ratios[f'SINGLETON vs NEW, {_threads(t)}']:.1f}x ({_threads(t)})"
                       for t in threads)
    paths.append(
        plot_groups(
            groups,
            directory / "core_throughput.png",
            title="connect + SELECT 1 on PostgreSQL: manager modes vs bare engines",
            subtitle=f"SINGLETON serves {versus} the queries of NEW",
            ylabel="queries per second (median of runs)",
            note=note,
        )
    )
    facade = by_name["facade"]
    paths.append(
        plot_latencies(
            facade.samples,
            directory / "core_connect.png",
            title="connect + SELECT 1: through the manager vs bare QueuePool engines",
            subtitle=(
                f"facade overhead {facade.params['overhead']:+.1%} on the same engine; "
                f"two identical bare engines differ by {facade.params['a_a_difference']:+.1%}"
            ),
            log=False,
            note=note,
        )
    )
    return paths


def facade_summary(facade: Result) -> str:
    """One line: each facade's overhead with its 95% interval, and the A/A noise."""
    params = facade.params

    def one(name: str, key: str) -> str:
        low, high = params[f"{key}_ci95"]
        return f"{name} {params[key]:+.1%} [{low:+.1%}, {high:+.1%}]"

    parts = [
        one("manager.connect()", "overhead"),
        one("engines.connect()", "default_overhead"),
        one("engines.get(db).connect()", "get_connect_overhead"),
    ]
    return (
        f"facade overhead on the same engine (median of {params['rounds']} blocks of "
        f"{params['batch']}, 95% CI): {', '.join(parts)}; vs a separate bare engine "
        f"{params['overhead_vs_separate_engine']:+.1%}; A/A {params['a_a_difference']:+.1%}"
    )


def instruction_summary(counted: Result) -> str:
    """One line: instructions per query of each way and the facades' overhead."""
    per_query, overhead = counted.params["per_query"], counted.params["overhead"]
    bare = f"{SAME_ENGINE} {per_query[SAME_ENGINE]:,.0f}"
    ways = ", ".join(f"{way} {per_query[way]:,.0f} ({overhead[way]:+.1%})" for way in FACADES)
    return f"client instructions per query ({counted.params['queries']} each): {bare}; {ways}"


def _threads(count: int) -> str:
    return f"{count} thread{'s' if count > 1 else ''}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_core", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run (< 20 s)")
    parser.add_argument("--uri", default=PG_URI, help="PostgreSQL URL (ENGINEHOUSE_BENCH_PG)")
    parser.add_argument(
        "--plots",
        type=Path,
        default=None,
        help=f"directory for PNG plots (default: {PLOTS_DIR} on full runs, none on --quick)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write no PNG")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is not met")
    parser.add_argument(
        "--replot", type=Path, metavar="JSON", help="only redraw the plots from a results file"
    )
    parser.add_argument(
        "--instructions",
        type=int,
        metavar="QUERIES",
        default=None,
        help="queries per way counted under callgrind (full: 500, quick: 0 = none)",
    )
    # The callgrind child (see bench_instructions): one way, counted, nothing printed.
    parser.add_argument("--count-instructions", metavar="WAY", help=argparse.SUPPRESS)
    parser.add_argument("--queries", type=int, default=500, help=argparse.SUPPRESS)
    parser.add_argument("--helper", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.count_instructions is not None:
        count_child(args.count_instructions, args.uri, args.queries, args.helper)
        return 0
    if args.replot is not None:
        saved = json.loads(args.replot.read_text())
        results = [Result.from_json(r) for r in saved["results"]]
        for path in plot(results, args.plots or PLOTS_DIR, when=saved["date"]):
            print(f"plot: {path}")
        return 0

    scale = QUICK if args.quick else FULL
    if args.instructions is not None:
        scale = replace(scale, instruction_queries=args.instructions)
    spec = database(args.uri)
    started = utc_now()
    print(f"enginehouse core benchmarks ({'quick' if args.quick else 'full'}), {started}")
    began = time.perf_counter()
    results = run(scale, spec)
    ratios = [ratio for result in results for ratio in result.ratios]
    print()
    print(format_table(ratios))
    facade = next(r for r in results if r.name == "facade")
    miss = next(r for r in results if r.name == "miss")
    print(f"\n{facade_summary(facade)}")
    print(f"a miss costs {miss.params['slowdown']:.2f}x a bare create_engine()")
    counted = next((r for r in results if r.name == "instructions"), None)
    if counted is not None:
        print(instruction_summary(counted))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    payload = {
        "benchmark": "core",
        "quick": args.quick,
        "date": started,
        "seconds": time.perf_counter() - began,
        "machine": machine_info(),
        "results": [r.to_json() for r in results],
    }
    print(f"results: {write_results('core', payload)}")

    directory = args.plots if args.plots is not None else (None if args.quick else PLOTS_DIR)
    if directory is not None and not args.no_plots:
        if plotting_available():
            for path in plot(results, directory, when=started):
                print(f"plot: {path}")
        else:
            print("plots skipped: matplotlib not installed (pip install -e '.[bench]')")
    missed = [r.label for r in ratios if r.met is False]
    if missed:
        print(f"goals not met: {', '.join(missed)}")
    return 1 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
