"""``max_tunnels_per_bastion``: SSH sessions per bastion under the budget keeper.

Real sshd, real PostgreSQL, real Redis. A session holds one tunnel permit from
open to close; a session that finds none within the connect timeout fails with
a ``TunnelError`` naming the bastion, and leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import wait_until
from fleet_fixtures import SHARED_REDIS, lease_count
from sqlalchemy import text
from sshd_fixtures import ThrowawaySshd, tunnel_threads
from test_tunnel_manager import bastion, database

from enginehouse import DatabaseSpec, EngineManager, SSHTunnelSpec
from enginehouse.errors import TunnelError
from enginehouse.stats import BudgetStats

pytestmark = pytest.mark.services("postgres", "redis")

# A short connect timeout bounds how long a session waits for a permit.
CAPPED: dict[str, Any] = {
    "max_tunnels_per_bastion": 1,
    "tunnel_connect_timeout": 2.0,
    "ask_timeout": 15,
    "cleanup_interval": 60,
}


def one(manager: EngineManager, database: DatabaseSpec) -> int:
    with manager.connect(database) as connection:
        return int(connection.execute(text("SELECT 1")).scalar_one())


def tunnel_budget(manager: EngineManager, spec: SSHTunnelSpec) -> BudgetStats | None:
    key = f"ssh:{spec.bastion}"
    return next((b for b in manager.stats().budgets if b.key == key), None)


def held(manager: EngineManager, spec: SSHTunnelSpec) -> int:
    budget = tunnel_budget(manager, spec)
    return 0 if budget is None else budget.held


def refused(manager: EngineManager, database: DatabaseSpec, spec: SSHTunnelSpec) -> None:
    """The connect fails with the cap error, and its attempt leaves no session or permit."""
    with pytest.raises(TunnelError, match="max_tunnels_per_bastion reached") as caught:
        one(manager, database)
    assert spec.bastion in str(caught.value)
    wait_until(lambda: manager.stats().tunnels == [], what="the refused tunnel to stop")
    assert held(manager, spec) == 0


@pytest.fixture
def clean_threads() -> Iterator[None]:
    yield
    wait_until(lambda: not tunnel_threads(), what="tunnel threads to end")


def test_embedded_cap_refuses_a_second_session_until_the_first_closes(
    sshd: ThrowawaySshd, clean_threads: None
) -> None:
    # Two tunnel specs of one bastion differ (host_key_policy), so each needs its own session.
    first_spec = bastion(sshd)
    second_spec = bastion(sshd, host_key_policy="accept")
    assert first_spec.bastion == second_spec.bastion
    assert first_spec.fingerprint != second_spec.fingerprint
    first, second = database(1, first_spec), database(2, second_spec)
    before = len(sshd.sessions())
    with EngineManager(**CAPPED) as manager:
        assert one(manager, first) == 1
        budget = tunnel_budget(manager, first_spec)
        assert budget is not None
        assert (budget.cap, budget.held, budget.mode) == (1, 1, "local")

        with pytest.raises(TunnelError, match="max_tunnels_per_bastion reached") as caught:
            one(manager, second)
        assert first_spec.bastion in str(caught.value)
        # Nothing left behind: one tunnel, one session, one permit, no waiter.
        wait_until(lambda: len(manager.stats().tunnels) == 1, what="the refused tunnel to stop")
        budget = tunnel_budget(manager, first_spec)
        assert budget is not None
        assert (budget.held, budget.waiting, budget.timeouts) == (1, 0, 1)
        wait_until(lambda: len(sshd.sessions()) == before + 1, what="one SSH session")

        manager.dispose(1)  # the last forward closes the session, which frees the permit
        wait_until(lambda: held(manager, first_spec) == 0, what="the permit to come back")
        assert one(manager, second) == 1
        assert held(manager, first_spec) == 1
        wait_until(lambda: len(sshd.sessions()) == before + 1, what="one SSH session")
    wait_until(lambda: len(sshd.sessions()) == before, what="the sessions to close")


def test_uncapped_manager_keeps_no_tunnel_budget(sshd: ThrowawaySshd, clean_threads: None) -> None:
    spec = bastion(sshd)
    with EngineManager(ask_timeout=15, cleanup_interval=60) as manager:
        assert one(manager, database(1, spec)) == 1
        assert tunnel_budget(manager, spec) is None


def test_embedded_cap_holds_across_the_managers_of_a_process(
    sshd: ThrowawaySshd, clean_threads: None
) -> None:
    spec = bastion(sshd)
    db = database(1, spec)
    with EngineManager(**CAPPED) as left, EngineManager(**CAPPED) as right:
        assert one(left, db) == 1
        refused(right, db, spec)  # left's session holds the process's only permit
        left.dispose(1)  # closes left's session: its permit goes back to the process
        wait_until(lambda: held(left, spec) == 0, what="the permit to come back")
        assert one(right, db) == 1
        assert held(right, spec) == 1
        refused(left, db, spec)


def test_fleet_cap_holds_across_managers(
    sshd: ThrowawaySshd, fleet_prefix: str, clean_threads: None
) -> None:
    spec = bastion(sshd)
    db = database(1, spec)
    key = f"ssh:{spec.bastion}"
    fleet: dict[str, Any] = {**CAPPED, "fleet_url": SHARED_REDIS, "fleet_prefix": fleet_prefix}
    fleet["cleanup_interval"] = 10  # leases (TTL 90 s) renew on the Janitor's rounds
    with EngineManager(**fleet) as left, EngineManager(**fleet) as right:
        assert one(left, db) == 1
        assert lease_count(SHARED_REDIS, fleet_prefix, key) == 1
        budget = tunnel_budget(left, spec)
        assert budget is not None and budget.mode == "fleet"

        refused(right, db, spec)
        assert lease_count(SHARED_REDIS, fleet_prefix, key) == 1

        left.dispose(1)  # closes left's session, so its lease leaves Redis
        wait_until(
            lambda: not lease_count(SHARED_REDIS, fleet_prefix, key), what="the lease to go"
        )
        assert one(right, db) == 1
        assert held(right, spec) == 1

        refused(left, db, spec)
        right.shutdown()  # shutting down gives the lease back too
        wait_until(
            lambda: not lease_count(SHARED_REDIS, fleet_prefix, key), what="the lease to go"
        )
        assert one(left, db) == 1
        assert lease_count(SHARED_REDIS, fleet_prefix, key) == 1


def test_reconnect_gives_the_dead_sessions_permit_back_first(
    sshd: ThrowawaySshd, clean_threads: None
) -> None:
    spec = bastion(sshd)
    db = database(1, spec)
    with EngineManager(**CAPPED) as manager:
        assert one(manager, db) == 1
        assert sshd.kill_sessions() >= 1
        wait_until(
            lambda: manager.stats().tunnels[0].state == "disconnected",
            what="the drop to be noticed",
        )
        # With a cap of 1 the reopen succeeds only if the dead session's permit came back.
        assert one(manager, db) == 1
        tunnel = manager.stats().tunnels[0]
        assert (tunnel.state, tunnel.connects, tunnel.restarts) == ("connected", 2, 1)
        budget = tunnel_budget(manager, spec)
        assert budget is not None
        assert (budget.held, budget.granted, budget.timeouts) == (1, 2, 0)
