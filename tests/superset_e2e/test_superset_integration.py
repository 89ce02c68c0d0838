"""What enginehouse.superset.install adds on top of C1's SQL Lab tests, checked from outside.

* a connection test (a model not saved yet) leaves no server connection behind, even in
  SINGLETON mode where saved databases keep pools;
* databases behind one bastion share its SSH session: no login per database or per query;
* metadata browsing (schemas, tables, a table's columns) comes from the manager's pools.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sshd_fixtures import USER

from .bastion import LoggingSshd
from .conftest import Target, pooled, shares_tunnels
from .harness import (
    Server,
    SupersetClient,
    Variant,
    backends,
    sessions_opened,
    settled_sessions,
    wait_for,
)

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


def test_metadata_browsing_is_served_by_the_manager(
    api: SupersetClient, server: Server, variant: Variant, target: Target, unique: str
) -> None:
    """Schemas, tables and a table's columns, as SQL Lab's left panel asks for them."""
    name, uri = target("browse")
    engine = sa.create_engine(uri.replace(":e2e-pg-pw-7731", ""), poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE browse_me (id int primary key, label text)"))
    engine.dispose()
    database = api.create_database(f"pg-browse-{unique}", uri)
    before = sessions_opened(name)
    rounds = 6
    for _ in range(rounds):
        assert "public" in api.schemas(database)
        tables = api.http.get(f"/api/v1/database/{database}/tables/",
                              params={"q": "(force:!t,schema_name:public)"})
        assert tables.status_code == 200, tables.text[:300]
        assert "browse_me" in {t["value"] for t in tables.json()["result"]}
        table = api.http.get(f"/api/v1/database/{database}/table/browse_me/public/")
        assert table.status_code == 200, table.text[:300]
        assert [c["name"] for c in table.json()["columns"]] == ["id", "label"]
    opened = settled_sessions(name) - before
    if pooled(variant):  # pools per worker: the database's, and its public schema's
        assert opened <= 2 * 2 * server.workers, f"{opened} sessions for {3 * rounds} calls"
    else:
        assert opened >= rounds, f"{opened} sessions for {3 * rounds} calls"
