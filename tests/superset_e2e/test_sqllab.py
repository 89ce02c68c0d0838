"""SQL Lab through Superset's REST API: PostgreSQL direct, MariaDB, behind SSH, async via Celery.

Each claim is checked from outside Superset: new PostgreSQL sessions per query from
``pg_stat_database.sessions`` of a database of the test's own, SSH logins from sshd's log.
Under the ``stock`` variant the same tests pin down Superset's own behaviour (one session and
one SSH login per query; ed25519 keys refused): the baseline enginehouse improves on.
"""

from __future__ import annotations

import pytest
from sshd_fixtures import USER

from .bastion import LoggingSshd
from .conftest import ENCRYPTED_PASSWORD, Target, pooled, shares_tunnels
from .harness import (
    Server,
    SupersetClient,
    SupersetError,
    Variant,
    sessions_opened,
    settled_sessions,
    wait_for,
)

pytestmark = pytest.mark.services("postgres", "mariadb", "redis")

QUERIES = 12


def tunnel(bastion: LoggingSshd, kind: str) -> dict[str, object]:
    return {
        "server_address": "127.0.0.1",
        "server_port": bastion.port,
        "username": USER,
        "private_key": bastion.keys[kind],
    }


def test_postgres_direct_opens_sessions_per_the_variant(
    api: SupersetClient, server: Server, variant: Variant, target: Target, unique: str
) -> None:
    name, uri = target("direct")
    before = sessions_opened(name)  # a database of this test's own: nothing else connects
    database = api.create_database(f"pg-direct-{unique}", uri)
    for n in range(QUERIES):
        assert api.query_rows(database, f"SELECT {n} AS n") == [{"n": n}]
    opened = settled_sessions(name) - before
    if pooled(variant):
        assert opened <= 2 * server.workers, f"{opened} sessions for {QUERIES} queries"
    else:
        assert opened >= QUERIES, f"{opened} sessions for {QUERIES} queries"


def test_mariadb_answers_and_tests_its_connection(api: SupersetClient, unique: str) -> None:
    uri = "mysql+pymysql://root@127.0.0.1:3306/test"
    assert api.test_connection(f"maria-{unique}", uri).status_code == 200
    database = api.create_database(f"maria-{unique}", uri)
    assert api.query_rows(database, "SELECT 1 + 1 AS two") == [{"two": 2}]
    assert api.query_rows(database, "SELECT DATABASE() AS db") == [{"db": "test"}]


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_postgres_behind_ssh(
    api: SupersetClient,
    server: Server,
    variant: Variant,
    bastions: dict[str, LoggingSshd],
    target: Target,
    unique: str,
    kind: str,
) -> None:
    bastion = bastions[kind]
    name, uri = target(f"ssh_{kind}")
    logins_before = bastion.logins()
    if kind == "ed25519" and not shares_tunnels(variant):
        # Stock 6.1 parses keys with RSAKey only: creation (which tests the tunnel) fails.
        with pytest.raises(SupersetError) as refused:
            api.create_database(f"ssh-{kind}-{unique}", uri, ssh_tunnel=tunnel(bastion, kind))
        assert "unpack requires a buffer" in refused.value.body
        return
    database = api.create_database(f"ssh-{kind}-{unique}", uri, ssh_tunnel=tunnel(bastion, kind))
    for n in range(QUERIES):
        rows = api.query_rows(database, f"SELECT {n} AS n, current_database() AS db")
        assert rows == [{"n": n, "db": name}]
    if shares_tunnels(variant):
        logins = bastion.logins() - logins_before
        assert 1 <= logins <= 2 * server.workers, f"{logins} SSH logins for {QUERIES} queries"
    else:
        wait_for(lambda: bastion.logins() - logins_before >= QUERIES, 30, "one login per query")


def test_ssh_database_tests_its_connection_with_the_masked_key(
    api: SupersetClient,
    bastions: dict[str, LoggingSshd],
    target: Target,
    unique: str,
    variant: Variant,
) -> None:
    """test_connection of a saved SSH database with the key masked, as Superset's UI sends it."""
    bastion = bastions["rsa"]
    _, uri = target(f"sshtest_{unique}")
    name = f"ssh-test-{unique}"
    api.create_database(name, uri, ssh_tunnel=tunnel(bastion, "rsa"))
    masked = {**tunnel(bastion, "rsa"), "private_key": "XXXXXXXXXX"}
    answer = api.test_connection(
        name, uri.replace(":e2e-pg-pw-7731", ":XXXXXXXXXX"), ssh_tunnel=masked
    )
    assert answer.status_code == 200, answer.text


def test_masked_encrypted_extra_reaches_the_connection(
    api: SupersetClient, target: Target, unique: str
) -> None:
    """Superset merges encrypted_extra's top-level keys into create_engine's arguments."""
    _, uri = target("encrypted")
    secret_extra = {
        "connect_args": {"application_name": f"e2e-enc-{unique}", "password": ENCRYPTED_PASSWORD}
    }
    database = api.create_database(f"pg-enc-{unique}", uri, masked_encrypted_extra=secret_extra)
    rows = api.query_rows(database, "SELECT current_setting('application_name') AS app")
    assert rows == [{"app": f"e2e-enc-{unique}"}]
    shown = api.database(database)
    assert ENCRYPTED_PASSWORD not in str(shown)


def test_async_sql_lab_runs_in_celery(api: SupersetClient, target: Target, unique: str) -> None:
    name, uri = target("async")
    database = api.create_database(f"pg-async-{unique}", uri)
    result = api.execute_async(database, "SELECT 42 AS answer, current_database() AS db")
    assert result["data"] == [{"answer": 42, "db": name}]


def test_async_sql_lab_behind_ssh(
    api: SupersetClient, bastions: dict[str, LoggingSshd], target: Target, unique: str
) -> None:
    name, uri = target("async_ssh")
    database = api.create_database(
        f"ssh-async-{unique}", uri, ssh_tunnel=tunnel(bastions["rsa"], "rsa")
    )
    result = api.execute_async(database, "SELECT 7 AS seven, current_database() AS db")
    assert result["data"] == [{"seven": 7, "db": name}]
