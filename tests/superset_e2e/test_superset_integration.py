"""What enginehouse.superset.install adds on top of C1's SQL Lab tests, checked from outside.

* a connection test (a model not saved yet) leaves no server connection behind, even in
  SINGLETON mode where saved databases keep pools;
* databases behind one bastion share its SSH session: no login per database or per query.
"""

from __future__ import annotations

import pytest
from sshd_fixtures import USER

from .bastion import LoggingSshd
from .conftest import Target, shares_tunnels
from .harness import Server, SupersetClient, Variant, backends, wait_for

pytestmark = pytest.mark.services("postgres", "mariadb", "redis")

QUERIES = 6


def test_a_connection_test_leaves_no_connection_open(
    api: SupersetClient, target: Target, unique: str
) -> None:
    name, uri = target(f"conntest_{unique}")
    for _ in range(3):
        answer = api.test_connection(f"conntest-{unique}", uri)
        assert answer.status_code == 200, answer.text
    wait_for(lambda: backends(name) == 0, 30, "no connection left by connection tests")


def test_databases_behind_one_bastion_share_its_session(
    api: SupersetClient,
    server: Server,
    variant: Variant,
    bastions: dict[str, LoggingSshd],
    target: Target,
    unique: str,
) -> None:
    if not shares_tunnels(variant):
        pytest.skip("stock Superset opens an SSH session per query")
    bastion = bastions["ed25519"]
    tunnel = {"server_address": "127.0.0.1", "server_port": bastion.port, "username": USER,
              "private_key": bastion.keys["ed25519"]}
    logins_before = bastion.logins()
    databases = []
    for label in ("first", "second", "third"):
        name, uri = target(f"shared_{label}_{unique}")
        databases.append((name, api.create_database(f"shared-{label}-{unique}", uri,
                                                    ssh_tunnel=tunnel)))
    for n in range(QUERIES):
        for name, database in databases:
            rows = api.query_rows(database, f"SELECT {n} AS n, current_database() AS db")
            assert rows == [{"n": n, "db": name}]
    logins = bastion.logins() - logins_before
    # At most one session per worker (each may still hold one from earlier tests: then 0).
    assert logins <= server.workers, f"{logins} SSH logins for {3 * QUERIES} queries"
