"""Alerts and reports (issue 12): an SQL alert, run by Superset's own Celery task, on an engine
from enginehouse.

The alert is created through ``POST /api/v1/report/`` and run by queuing ``reports.execute``
(what Superset's beat scheduler queues for a due alert) to the suite's Celery worker. Its SQL
returns the PostgreSQL backend's pid and its validator (``< 0``) never triggers, so nothing is
sent; Superset stores the value of each run in the alert's execution log. (An alert is about a
chart, which it would send when triggered: the test makes a one-row table, dataset and chart.)
From outside Superset: the log (``GET /api/v1/report/<id>/log/``), and the target database's
``pg_stat_database.sessions``. Pooled (SINGLETON): the runs share the Celery processes' pooled
connections (few backends, few sessions); stock and NEW: one new backend per run.
"""

from __future__ import annotations

from functools import partial

import pytest
import sqlalchemy as sa

from .conftest import Target, pooled
from .harness import (
    Server,
    SupersetClient,
    SupersetSite,
    Variant,
    settled_sessions,
    wait_for,
)

pytestmark = pytest.mark.services("postgres", "redis")

RUNS = 4
CELERY_PROCESSES = 2  # SupersetSite.start_celery's default concurrency
NOT_TRIGGERED = "Not triggered"  # superset.reports.models.ReportState.NOOP


def finished_runs(api: SupersetClient, report: int) -> list[dict[str, object]]:
    """The log entries of runs that ended; fails at once on a run that ended in error."""
    logs = api.report_logs(report)
    failed = [entry for entry in logs if entry["state"] == "Error"]
    assert not failed, f"alert run failed: {failed[0]['error_message']}"
    return [entry for entry in logs if entry["state"] == NOT_TRIGGERED]


def ran(api: SupersetClient, report: int, runs: int) -> bool:
    return len(finished_runs(api, report)) >= runs


def test_an_alert_runs_in_celery_on_the_variants_engine(
    api: SupersetClient,
    server: Server,
    site: SupersetSite,
    variant: Variant,
    target: Target,
    unique: str,
) -> None:
    name, uri = target("alert")
    engine = sa.create_engine(uri.replace(":e2e-pg-pw-7731", ""), poolclass=sa.pool.NullPool)
    with engine.begin() as conn:  # an alert is about a chart: a table for its dataset
        conn.execute(sa.text("CREATE TABLE watched AS SELECT 1 AS n"))
    engine.dispose()
    database = api.create_database(f"pg-alert-{unique}", uri)
    chart = api.create_chart(api.create_dataset(database, "watched"), f"watched-{unique}",
                             {"viz_type": "table"})
    before = settled_sessions(name)  # creation's connections included
    report = api.create_alert(
        f"alert-{unique}", database, "SELECT pg_backend_pid() AS pid",
        chart=chart, op="<", threshold=0,
    )
    for run in range(1, RUNS + 1):  # one at a time: a run still working would refuse the next
        site.send_task("reports.execute", [report])
        wait_for(partial(ran, api, report, run), 120, f"alert run {run}")
    runs = finished_runs(api, report)
    assert len(runs) == RUNS
    pids = {int(float(str(entry["value"]))) for entry in runs}  # the alert's value: a pid
    assert all(pid > 0 for pid in pids)
    opened = settled_sessions(name) - before
    if pooled(variant):
        assert len(pids) <= CELERY_PROCESSES, f"{len(pids)} backends for {RUNS} runs"
        assert opened <= CELERY_PROCESSES, f"{opened} sessions for {RUNS} runs"
    else:
        assert len(pids) == RUNS, f"{len(pids)} backends for {RUNS} runs"
        assert opened >= RUNS, f"{opened} sessions for {RUNS} runs"
