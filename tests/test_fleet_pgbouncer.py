"""Budgets compose with PgBouncer: engines point at it, psycopg prepares nothing (issue 5)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fleet_fixtures import SHARED_REDIS, unique
from pgbouncer_fixtures import PgBouncer
from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager

pytestmark = pytest.mark.services("postgres", "redis")

DOUBLE = text("SELECT CAST(:n AS int) * 2")


def bouncer_spec(bouncer: PgBouncer, application_name: str, cap: int) -> DatabaseSpec:
    return DatabaseSpec(
        id=unique("db"),
        uri=bouncer.uri,
        extra={
            "max_connections": cap,
            "engine_params": {
                # Transaction pooling moves a client between server connections:
                # psycopg's automatic prepared statements must stay off.
                "connect_args": {"prepare_threshold": None, "application_name": application_name},
                "pool_timeout": 60,
            },
        },
    )


def test_budget_in_front_of_pgbouncer(pgbouncer: PgBouncer, fleet_prefix: str) -> None:
    app = unique("eh-bouncer")
    database = bouncer_spec(pgbouncer, app, 3)
    wrong: list[tuple[int, Any]] = []
    done: list[int] = []
    client_counts: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            clients = pgbouncer.show("CLIENTS")
            client_counts.append(sum(1 for c in clients if c.get("application_name") == app))
            stop.wait(0.005)

    settings = {"fleet_url": SHARED_REDIS, "fleet_prefix": fleet_prefix, "cleanup_interval": 0.5}
    with EngineManager(**settings, fleet_lease_ttl=10) as manager:

        def work(offset: int) -> None:
            count = 0
            for n in range(offset, offset + 60):
                with manager.connect(database) as connection:
                    # The same statement many times: psycopg would prepare it by the 5th.
                    value = connection.execute(DOUBLE, {"n": n}).scalar()
                if value != n * 2:
                    wrong.append((n, value))
                count += 1
            done.append(count)

        sampler = threading.Thread(target=sample)
        sampler.start()
        threads = [threading.Thread(target=work, args=(1000 * i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stop.set()
        sampler.join(timeout=20)
        budget = next(b for b in manager.stats().budgets if b.key == f"db:{database.id}")
    assert wrong == []
    assert done == [60] * 8
    assert client_counts and max(client_counts) <= 3
    assert budget.cap == 3 and budget.mode == "fleet"
    pools = [p for p in pgbouncer.show("POOLS") if p["database"] == "test"]
    assert pools and all(int(str(p["sv_active"])) + int(str(p["sv_idle"])) <= 4 for p in pools)
