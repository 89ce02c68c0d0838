"""The fault-injection soak's short run (benchmarks/soak.py --short): its report's invariants.

One run (~40 s of traffic, ~2 min in all) serves every test of this module.
No timing is asserted (recovery times are figures for docs/reliability.md);
what must hold whatever the load: only our errors (or the database's own
DBAPIError) reach callers, no secret in any captured log, every kind of
traffic is served, every worker finishes and leaves no thread or server
connection, every permit comes back, the fleet cap holds.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import soak

pytestmark = [pytest.mark.services("postgres", "mariadb", "redis"), pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def report() -> Iterator[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="enginehouse-soak-test-"))
    try:
        data = soak.run(soak.SHORT, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    yield json.loads(json.dumps(data, default=str))  # what the results file holds


def test_only_our_errors_or_the_databases_reach_callers(report: dict[str, Any]) -> None:
    """A failed checkout is ours (ConnectFailedError, even for a bare OSError such as EMFILE);
    a query on a connection the caller holds may fail with the database's DBAPIError."""
    assert report["defects"] == {}
    for kind, failed in report["queries_failed"].items():
        for error in failed:
            assert error.startswith(("ours:", "database:")), (kind, error)


def test_every_kind_of_traffic_is_served(report: dict[str, Any]) -> None:
    assert all(report["queries_ok"][kind] > 0 for kind in soak.KINDS), report["queries_ok"]
    assert [w["fault"] for w in report["faults"]] == [f.name for f in soak.SHORT.faults]
    mysql_back = [w["recovery_s"]["mysql"] for w in report["faults"]]
    assert all(r is not None for r in mysql_back), mysql_back  # no fault stops MariaDB for good


def test_no_secret_in_any_captured_log(report: dict[str, Any]) -> None:
    scan = report["secrets_found"]
    assert scan["count"] == 0, scan["found"]
    assert scan["files"] >= 2 * report["workers_expected"] and scan["bytes"] > 0


def test_every_worker_finishes_and_leaves_nothing(report: dict[str, Any]) -> None:
    assert report["after"]["hung_workers"] == []
    assert report["workers_finished"] == report["workers_expected"]
    assert set(report["after"]["exit_codes"].values()) == {0}
    assert all(not names for names in report["server_connections_left"].values()), report[
        "server_connections_left"
    ]
    assert all(not names for names in report["threads_left"].values()), report["threads_left"]


def test_the_server_side_sampler_saw_the_traffic(report: dict[str, Any]) -> None:
    peaks = report["peak_server_connections"]
    assert peaks["pg"] >= 1 and peaks["ssh"] >= 1, peaks


def test_permits_come_back(report: dict[str, Any]) -> None:
    """Issue 13 items 1 and 9: no permit outlives its connection or its process's shutdown."""
    assert report["permits_outstanding"]["live_processes"] == 0, report["permits_outstanding"]
    differences = report["permits_without_connection"]
    assert differences and all(n == 0 for n in differences.values()), differences


def test_the_fleet_cap_holds(report: dict[str, Any]) -> None:
    assert report["peak_server_connections"]["pg"] <= report["cap"], report["cap_peaks_by_fault"]
