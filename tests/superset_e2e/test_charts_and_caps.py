"""Chart data through a dataset and a chart; a per-database cap held across both workers;
Superset's query source reaching the pool (``extra.connection_shares``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from .conftest import LEAK_THRESHOLD, Target, shares_tunnels
from .harness import PeakSampler, Server, SupersetClient, Variant, wait_for

pytestmark = pytest.mark.services("postgres", "redis")

CAP = 2


def test_chart_data_from_a_dataset(api: SupersetClient, target: Target, unique: str) -> None:
    _name, uri = target("charts")
    engine = sa.create_engine(uri.replace(":e2e-pg-pw-7731", ""), poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE numbers AS SELECT g AS n, g % 3 AS k FROM generate_series(1, 30) g"
            )
        )
    database = api.create_database(f"pg-charts-{unique}", uri)
    dataset = api.create_dataset(database, "numbers")
    chart = api.create_chart(dataset, f"numbers-{unique}", {"viz_type": "table"})
    query = {
        "columns": ["k"],
        "metrics": [{"expressionType": "SQL", "sqlExpression": "SUM(n)", "label": "total"}],
        "orderby": [["k", True]],
        "row_limit": 10,
    }
    data = api.chart_data(dataset, chart, query)["result"][0]["data"]
    assert data == [{"k": 0, "total": 165}, {"k": 1, "total": 145}, {"k": 2, "total": 155}]


def test_a_cap_holds_across_both_workers(
    api: SupersetClient, server: Server, variant: Variant, target: Target, unique: str
) -> None:
    """extra.max_connections: 8 concurrent clients, never more than CAP server connections."""
    name, uri = target("cap")
    database = api.create_database(f"pg-cap-{unique}", uri, extra={"max_connections": CAP})
    clients = [server.client() for _ in range(8)]

    def run(client: SupersetClient) -> list[list[dict[str, object]]]:
        return [
            client.query_rows(database, "SELECT 1 AS one FROM pg_sleep(0.15)") for _ in range(3)
        ]

    try:
        with PeakSampler(name) as sampler, ThreadPoolExecutor(len(clients)) as pool:
            results = list(pool.map(run, clients))
    finally:
        for client in clients:
            client.close()
    assert all(rows == [{"one": 1}] for batch in results for rows in batch)
    assert sampler.samples > 0 and sampler.peak >= 1
    if not shares_tunnels(variant):
        return  # stock Superset has no cap
    # enginehouse: the cap, fleet-wide through Redis (8 clients would open 8 without it).
    assert sampler.peak <= CAP, f"{sampler.peak} connections under a cap of {CAP}"


def test_query_source_reaches_the_pool(
    api: SupersetClient, server: Server, variant: Variant, target: Target, unique: str
) -> None:
    """SQL Lab's checkouts carry ``QuerySource.SQL_LAB``: the pool's shares and leak detection
    see it. Observed from outside: the leak warning for a query held past the threshold names
    the database and the source."""
    _name, uri = target("source")
    shares = {"DASHBOARD": 3, "CHART": 2, "SQL_LAB": 1}
    database = api.create_database(
        f"pg-source-{unique}", uri, extra={"max_connections": 4, "connection_shares": shares}
    )
    held = LEAK_THRESHOLD * 2.5
    rows = api.query_rows(database, f"SELECT 1 AS one FROM pg_sleep({held})")
    assert rows == [{"one": 1}]
    if not shares_tunnels(variant):
        return  # stock Superset has neither shares nor leak detection
    warning = f"connection leak suspected: database {database}, source SQL_LAB"
    wait_for(lambda: warning in server.process.log.read_text(errors="replace"), 30,
             "the leak warning naming SQL_LAB")
