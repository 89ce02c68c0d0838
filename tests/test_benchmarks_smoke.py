"""Smoke tests of the core benchmarks: each runs tiny and returns well-formed results.

No timing is asserted here (timings belong to the benchmark runs themselves).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import bench_core, common
from benchmarks.common import Ratio, Result
from enginehouse import DatabaseSpec
from enginehouse.default import DefaultEngines
from tests.conftest import PG_URI

pytestmark = pytest.mark.services("postgres", "redis")

TINY = bench_core.Scale(
    hit_rounds=3, facade_rounds=3, miss_rounds=2, miss_batch=2, mode_seconds=0.2, mode_repeats=1,
    facade_batch=2,
)


@pytest.fixture
def spec() -> DatabaseSpec:
    return bench_core.database(PG_URI, database_id="bench-smoke")


def check(result: Result, name: str, ratio_count: int) -> None:
    """Shape checks shared by every benchmark result."""
    assert result.name == name
    assert len(result.ratios) == ratio_count
    for ratio in result.ratios:
        assert isinstance(ratio, Ratio)
        for number in (ratio.value, ratio.candidate_value, ratio.baseline_value):
            assert math.isfinite(number) and number > 0, ratio
        assert ratio.met in (None, True, False)
    for values in [*result.samples.values(), *result.throughput.values()]:
        assert values and all(math.isfinite(v) and v > 0 for v in values)
    encoded = json.loads(json.dumps(result.to_json()))
    assert encoded["name"] == name
    assert len(encoded["ratios"]) == ratio_count
    table = common.format_table(result.ratios)
    assert all(r.label in table for r in result.ratios)


def test_hit_path(spec: DatabaseSpec) -> None:
    default = DefaultEngines()
    result = bench_core.bench_hit_path(spec, rounds=3, default=default)
    check(result, "hit_path", 4)
    assert set(result.samples) == {
        "manager.get() hit",
        "engines.get() hit",
        "pykka ask round trip",
        "create_engine()",
    }
    assert all(len(v) == 3 for v in result.samples.values())
    assert [r.goal for r in result.ratios] == [15.0, 10.0, 15.0, 10.0]
    assert default._manager is None  # the benchmark shut its default manager down


def test_modes(spec: DatabaseSpec) -> None:
    result = bench_core.bench_modes(spec, seconds=0.2, repeats=1, thread_counts=(1, 2))
    check(result, "modes", 6)
    ways = ("SINGLETON", "NEW", "bare QueuePool", "bare NullPool")
    assert set(result.throughput) == {f"{way} {n}t" for way in ways for n in (1, 2)}


def test_facade(spec: DatabaseSpec) -> None:
    result = bench_core.bench_facade(spec, rounds=4, batch=2, reconnect_every=2)
    check(result, "facade", 5)
    assert list(result.samples) == [
        bench_core.FACADE,
        bench_core.DEFAULT,
        bench_core.GET_CONNECT,
        bench_core.SAME_ENGINE,
        bench_core.DEFAULT_ENGINE,
        bench_core.BARE,
        bench_core.TWIN,
    ]
    assert all(len(v) == 4 for v in result.samples.values())
    assert [r.goal is not None for r in result.ratios] == [True, True, True, False, False]
    assert math.isfinite(result.params["overhead"])
    for key in ("overhead_ci95", "default_overhead_ci95", "get_connect_overhead_ci95"):
        low, high = result.params[key]
        assert low <= high
    assert "95% CI" in bench_core.facade_summary(result)


def test_overhead_interval_brackets_the_median() -> None:
    candidate = [1.0 + i / 100 for i in range(100)]
    low, high = bench_core._overhead_interval(candidate, [1.0] * 100)
    assert low < 0.495 < high  # the median overhead lies inside
    assert high - low < 0.25  # and the interval is narrower than the spread


def test_instruction_child_counts_only_when_asked() -> None:
    assert bench_core.QUICK.instruction_queries == 0  # --quick never starts valgrind
    assert bench_core.FULL.instruction_queries > 0


def test_miss(spec: DatabaseSpec) -> None:
    result = bench_core.bench_miss(spec, rounds=2, batch=2)
    check(result, "miss", 1)
    assert [len(v) for v in result.samples.values()] == [2, 2]


def test_main_writes_table_json_and_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_core, "QUICK", TINY)
    written: list[Path] = []

    def write(name: str, payload: Any) -> Path:
        written.append(common.write_results(name, payload, tmp_path / "results"))
        return written[-1]

    monkeypatch.setattr(bench_core, "write_results", write)
    code = bench_core.main(["--quick", "--uri", PG_URI, "--plots", str(tmp_path / "img")])
    out = capsys.readouterr().out
    assert code == 0
    assert "| measure" in out and "SINGLETON vs NEW, 8 threads" in out
    payload = json.loads(written[0].read_text())
    assert payload["benchmark"] == "core" and payload["quick"] is True
    assert [r["name"] for r in payload["results"]] == ["hit_path", "facade", "miss", "modes"]
    assert (tmp_path / "results" / "core-latest.json").is_file()
    if not common.plotting_available():
        assert "plots skipped" in out
        return
    expected = ["core_connect.png", "core_hit_path.png", "core_throughput.png"]
    assert sorted(p.name for p in (tmp_path / "img").glob("*.png")) == expected
    assert all((tmp_path / "img" / n).read_bytes()[:4] == b"\x89PNG" for n in expected)
    # The same plots again from the results file alone.
    args = ["--replot", str(written[0]), "--plots", str(tmp_path / "again")]
    assert bench_core.main(args) == 0
    assert sorted(p.name for p in (tmp_path / "again").glob("*.png")) == expected


def test_statistics_helpers() -> None:
    assert common.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert common.percentile([0.0, 10.0], 90) == pytest.approx(9.0)
    assert common.paired_ratio([4.0, 9.0, 2.0], [2.0, 3.0, 2.0]) == 2.0
    with pytest.raises(ValueError):
        common.paired_ratio([1.0], [])
    assert common.format_value(1.7e-6, "s") == "1.70 us"
    assert common.format_value(0.00241, "s") == "2.41 ms"
    assert common.format_value(3120.4, "q/s") == "3,120 q/s"
    stats = common.summary([1.0, 2.0, 3.0, 4.0])
    assert stats["p50"] == 2.5 and stats["min"] == 1.0 and stats["max"] == 4.0


def test_budget_benchmark_runs_and_its_shared_cap_holds() -> None:
    from benchmarks import bench_budget

    cost = bench_budget.permit_cost(rounds=1, batch=2)
    assert set(cost["median_s"]) == {
        "raw SQLAlchemy",
        "raw, waiting for the server to drop each",
        "embedded budget",
        "fleet budget (Redis)",
    }
    shared = bench_budget.two_managers("shared process cap", seconds=0.3)
    assert shared["errors"] == 0 and shared["qps"] > 0
    assert 1 <= shared["peak"] <= bench_budget.CAP


def test_shares_benchmark_runs_tiny_and_keeps_the_cap(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from benchmarks import bench_shares

    monkeypatch.setattr(bench_shares, "SQL_LAB_QUERY", "SELECT pg_sleep(0.05)")
    monkeypatch.setattr(bench_shares, "THREADS", 2)
    data = bench_shares.run(seconds=0.4, repeats=1)
    assert {(p["workload"], p["alternative"]) for p in data["phases"]} == {
        (w, a) for w in bench_shares.WORKLOADS for a in (bench_shares.FIFO, bench_shares.FAIR)
    }
    for phase in data["phases"]:
        assert phase["errors"] == [] and 1 <= phase["peak_connections"] <= bench_shares.CAP
        assert phase["waits"]["DASHBOARD"] and phase["waits"]["SQL_LAB"]
    assert "dashboard wait p99" in bench_shares.report(data)
    if common.plotting_available():
        assert bench_shares.plot(data, tmp_path / "shares.png").stat().st_size > 0


def test_observe_leaks_scenario_reports_the_held_connection(tmp_path: Path) -> None:
    from benchmarks import observe

    leaks = observe.run_leaks(duration=4.0, threshold=0.5, hold=60.0)  # held until the end
    assert len(leaks["warnings_at"]) == 1  # one warning for the one long holder
    assert leaks["samples"][-1]["leaks_total"] == 1
    sources = {h["source"] for s in leaks["samples"] for h in s["holders"]}
    assert sources == {"SQL_LAB"}  # the DASHBOARD threads' short checkouts never show
    if common.plotting_available():
        assert observe.plot_leaks(leaks, tmp_path / "leaks.png").stat().st_size > 0


def test_fleet_shares_benchmark_runs_tiny_and_keeps_the_cap(
    monkeypatch: pytest.MonkeyPatch, fleet_prefix: str
) -> None:
    from benchmarks import bench_shares

    monkeypatch.setattr(bench_shares, "SQL_LAB_QUERY", "SELECT pg_sleep(0.05)")
    monkeypatch.setattr(bench_shares, "THREADS", 2)
    monkeypatch.setattr(bench_shares, "FLEET_PREFIX", fleet_prefix)  # keys go with the test
    data = bench_shares.run(seconds=0.4, repeats=1, fleet=True)
    assert data["params"]["fleet"] is True
    for phase in data["phases"]:
        assert phase["errors"] == [] and 1 <= phase["peak_connections"] <= bench_shares.CAP
        assert phase["waits"]["DASHBOARD"] and phase["waits"]["SQL_LAB"]
    assert "by process / by source" in bench_shares.report(data)


def test_handoff_benchmark_runs_tiny() -> None:
    from benchmarks import bench_handoff

    data = bench_handoff.run(seconds=0.3, repeats=1)
    assert {(r["alternative"], r["query"]) for r in data["results"]} == {
        (a, q) for a in (bench_handoff.HANDOFF, bench_handoff.QUEUEPOOL)
        for q in bench_handoff.QUERIES
    }
    handoff = [r for r in data["results"] if r["alternative"] == bench_handoff.HANDOFF]
    assert all(len(r["per_thread"]) == bench_handoff.THREADS for r in handoff)
    assert "longest wait" in bench_handoff.report(data)
