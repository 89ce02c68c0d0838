"""Superset's SSH manager interface, answered by shared tunnels: real sshd, real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import PG_URI, wait_until
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url
from sshd_fixtures import KEY_PASSPHRASE, PASSWORD, USER, ThrowawaySshd, tunnel_threads
from test_superset_hook import make_core

from enginehouse import EngineManager
from enginehouse.errors import InvalidSpecError
from enginehouse.integrations.superset.config import TunnelOptions
from enginehouse.integrations.superset.engine_hook import FORWARD, EngineHook, patch
from enginehouse.integrations.superset.ssh import SSHManager


@dataclass
class SSHTunnel:
    """The columns of Superset 6.1's SSHTunnel model."""

    server_port: int
    private_key: str | None = None
    private_key_password: str | None = None
    password: str | None = None
    server_address: str = "127.0.0.1"
    username: str = USER
    database_id: int | None = 41


@pytest.fixture(params=["singleton", "new"])
def manager(request: pytest.FixtureRequest) -> Iterator[EngineManager]:
    with EngineManager(mode=request.param, cleanup_interval=60, ask_timeout=15) as manager:
        yield manager
    wait_until(lambda: not tunnel_threads(), what="tunnel threads to end")


def get_sqla_engine(
    core: Any, ssh: SSHManager, database: Any, tunnel: SSHTunnel, **kwargs: Any
) -> Engine:
    """What Superset's ``Database.get_sqla_engine`` does around ``_get_sqla_engine``."""
    with ssh.create_tunnel(ssh_tunnel=tunnel, sqlalchemy_database_uri=PG_URI) as server:
        uri = ssh.build_sqla_url(PG_URI, server)
        return database._get_sqla_engine(sqlalchemy_uri=uri, **kwargs)


def scalar(engine: Engine, sql: str) -> Any:
    with engine.connect() as connection:
        return connection.execute(text(sql)).scalar_one()


@pytest.mark.parametrize(
    ("key", "passphrase"),
    [("ed25519", None), ("ecdsa", None), ("rsa", None), ("rsa_pem_passphrase", KEY_PASSPHRASE)],
)
def test_every_key_type_queries_through_one_session(
    manager: EngineManager, sshd: ThrowawaySshd, key: str, passphrase: str | None
) -> None:
    ssh = SSHManager(lambda: manager, TunnelOptions())
    core = make_core()
    patch(core, EngineHook(lambda: manager))
    tunnel = SSHTunnel(sshd.port, private_key=sshd.keys[key], private_key_password=passphrase)
    database = core.Database(41)
    before = len(sshd.sessions())
    engines = [get_sqla_engine(core, ssh, database, tunnel) for _ in range(10)]
    assert {scalar(engine, "select 1") for engine in engines} == {1}
    assert len(sshd.sessions()) - before <= 1  # one SSH session served all ten
    stats = manager.stats().tunnels
    assert [tunnel.connects for tunnel in stats] == [1]
    assert len({tunnel.forwards[0].local_port for tunnel in stats}) == 1
    if manager.settings.mode == "singleton":
        assert len({id(engine) for engine in engines}) == 1


def test_the_context_is_shaped_like_sshtunnels_forwarder(sshd: ThrowawaySshd) -> None:
    with EngineManager(mode="singleton", cleanup_interval=60) as manager:
        ssh = SSHManager(lambda: manager, TunnelOptions())
        tunnel = SSHTunnel(sshd.port, password=PASSWORD)
        first = ssh.create_tunnel(ssh_tunnel=tunnel, sqlalchemy_database_uri=PG_URI)
        with first as server:
            assert FORWARD.get() is server.forward
            host, port = server.local_bind_address
            assert (host, port) == ("127.0.0.1", server.local_bind_port)
            url = make_url(str(ssh.build_sqla_url(PG_URI, server)))
            assert (url.host, url.port, url.database) == ("127.0.0.1", port, "test")
        assert FORWARD.get() is None
        again = ssh.create_tunnel(ssh_tunnel=tunnel, sqlalchemy_database_uri=PG_URI)
        assert again.local_bind_port == first.local_bind_port  # stable: one shared forward


def test_a_singleton_engine_is_keyed_on_the_real_end_and_watches_the_transport(
    private_sshd: ThrowawaySshd,
) -> None:
    sshd = private_sshd
    with EngineManager(mode="singleton", cleanup_interval=60) as manager:
        ssh = SSHManager(lambda: manager, TunnelOptions())
        core = make_core()
        patch(core, EngineHook(lambda: manager))
        tunnel = SSHTunnel(sshd.port, private_key=sshd.keys["ed25519"])
        database = core.Database(42)
        engine = get_sqla_engine(core, ssh, database, tunnel)
        assert scalar(engine, "select 1") == 1
        (pool,) = manager.stats().engines
        assert pool.url.startswith("postgresql")
        assert sshd.kill_sessions() >= 1  # the bastion drops us: the same engine reconnects
        wait_until(
            lambda: manager.stats().tunnels[0].state == "disconnected",
            what="the drop to be noticed",
        )
        assert scalar(get_sqla_engine(core, ssh, database, tunnel), "select 2") == 2
        assert get_sqla_engine(core, ssh, database, tunnel) is engine


def test_a_uri_without_host_or_known_port_names_the_field(sshd: ThrowawaySshd) -> None:
    with EngineManager(mode="new", cleanup_interval=60) as manager:
        ssh = SSHManager(lambda: manager, TunnelOptions())
        tunnel = SSHTunnel(sshd.port, password=PASSWORD)
        with pytest.raises(InvalidSpecError, match="sqlalchemy_uri"):
            ssh.create_tunnel(ssh_tunnel=tunnel, sqlalchemy_database_uri="postgresql:///test")
        with pytest.raises(InvalidSpecError, match="sqlalchemy_uri"):
            ssh.create_tunnel(ssh_tunnel=tunnel, sqlalchemy_database_uri="trino://h/hive")


def test_strict_host_keys_refuse_an_unknown_bastion(sshd: ThrowawaySshd, tmp_path: Any) -> None:
    # A known_hosts file of its own: the shared one may hold a pin-first pin of this sshd.
    known = tmp_path / "known_hosts"
    with EngineManager(mode="new", cleanup_interval=60, ssh_known_hosts_file=known) as manager:
        ssh = SSHManager(lambda: manager, TunnelOptions(strict_host_keys=True))
        tunnel = SSHTunnel(sshd.port, password=PASSWORD, server_address="127.0.0.1")
        with pytest.raises(Exception, match="strict"):
            ssh.create_tunnel(ssh_tunnel=tunnel, sqlalchemy_database_uri=PG_URI)


def test_strict_host_keys_accept_the_known_hosts_file(sshd: ThrowawaySshd, tmp_path: Any) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(sshd.host_key_line + "\n")
    with EngineManager(mode="new", cleanup_interval=60, ssh_known_hosts_file=known) as manager:
        ssh = SSHManager(lambda: manager, TunnelOptions(strict_host_keys=True))
        core = make_core()
        patch(core, EngineHook(lambda: manager))
        tunnel = SSHTunnel(sshd.port, password=PASSWORD, database_id=43)
        engine = get_sqla_engine(core, ssh, core.Database(43), tunnel)
        assert scalar(engine, "select 3") == 3
