"""SSH tunnels through the facade: real sshd, real PostgreSQL, both modes."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import PG_URI, wait_until
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sshd_fixtures import PASSWORD, USER, ThrowawaySshd, tunnel_threads

from enginehouse import DatabaseSpec, EngineManager, SSHTunnelSpec
from enginehouse.errors import TunnelError
from enginehouse.messages.tunnel import TunnelStats

pytestmark = pytest.mark.services("postgres")


def bastion(server: ThrowawaySshd, **values: Any) -> SSHTunnelSpec:
    values.setdefault("password", PASSWORD)
    return SSHTunnelSpec(
        server_address="127.0.0.1", server_port=server.port, username=USER, **values
    )


def database(db_id: int, tunnel: SSHTunnelSpec, dbname: str = "test", **extra: Any) -> DatabaseSpec:
    uri = PG_URI.rsplit("/", 1)[0] + f"/{dbname}"
    return DatabaseSpec(id=db_id, uri=uri, ssh_tunnel=tunnel, extra=extra)


def make_manager(mode: str, **settings: Any) -> EngineManager:
    settings.setdefault("ask_timeout", 15)
    return EngineManager(mode=mode, cleanup_interval=60, **settings)


@pytest.fixture(params=["singleton", "new"])
def any_manager(request: pytest.FixtureRequest) -> Iterator[EngineManager]:
    with make_manager(request.param) as manager:
        yield manager
    wait_until(lambda: not tunnel_threads(), what="tunnel threads to end")


def scalar(engine: Engine, sql: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql)).scalar()


def only_tunnel(manager: EngineManager) -> TunnelStats:
    tunnels = manager.stats().tunnels
    assert len(tunnels) == 1, tunnels
    return tunnels[0]


def sessions_settle(server: ThrowawaySshd, count: int) -> None:
    wait_until(lambda: len(server.sessions()) == count, what=f"{count} SSH sessions")


def test_queries_through_the_tunnel_in_both_modes(
    any_manager: EngineManager, sshd: ThrowawaySshd
) -> None:
    before = len(sshd.sessions())
    db = database(1, bastion(sshd))
    for _ in range(3):
        with any_manager.connect(db) as conn:
            assert conn.execute(text("SELECT current_database()")).scalar() == "test"
    engine = any_manager.get(db)
    assert engine.url.host == "127.0.0.1"
    assert engine.url.port != 5432
    tunnel = only_tunnel(any_manager)
    # NEW mode builds new engines, never new SSH sessions.
    assert (tunnel.state, tunnel.connects) == ("connected", 1)
    sessions_settle(sshd, before + 1)


def test_two_databases_behind_one_bastion_share_one_transport(
    any_manager: EngineManager, sshd: ThrowawaySshd
) -> None:
    before = len(sshd.sessions())
    tunnel = bastion(sshd)
    first, second = database(1, tunnel), database(2, tunnel, dbname="postgres")
    assert scalar(any_manager.get(first), "SELECT current_database()") == "test"
    assert scalar(any_manager.get(second), "SELECT current_database()") == "postgres"
    stats = only_tunnel(any_manager)
    assert stats.connects == 1
    assert [(f.remote, f.owners) for f in stats.forwards] == [("127.0.0.1:5432", 2)]
    sessions_settle(sshd, before + 1)
    # dispose() releases one database's forwards; the last one closes the session.
    any_manager.dispose(1)
    assert only_tunnel(any_manager).forwards[0].owners == 1
    assert scalar(any_manager.get(second), "SELECT 1") == 1
    any_manager.dispose(2)
    wait_until(lambda: any_manager.stats().tunnels == [], what="the tunnel to close")
    sessions_settle(sshd, before)


def test_concurrent_first_use_makes_one_session(sshd: ThrowawaySshd) -> None:
    before = len(sshd.sessions())
    tunnel = bastion(sshd)
    specs = [database(10 + i, tunnel) for i in range(8)]
    barrier = threading.Barrier(len(specs))

    def first_use(spec: DatabaseSpec) -> int:
        barrier.wait(timeout=30)
        with manager.connect(spec) as conn:
            return int(conn.execute(text("SELECT 1")).scalar_one())

    with make_manager("singleton") as manager, ThreadPoolExecutor(len(specs)) as pool:
        assert list(pool.map(first_use, specs)) == [1] * len(specs)
        assert only_tunnel(manager).connects == 1
        sessions_settle(sshd, before + 1)
    sessions_settle(sshd, before)


def test_fifty_concurrent_queries_through_one_bastion(sshd: ThrowawaySshd) -> None:
    db = database(1, bastion(sshd), engine_params={"pool_size": 10, "max_overflow": 40})
    barrier = threading.Barrier(50)

    def query(i: int) -> int:
        barrier.wait(timeout=30)
        with manager.connect(db) as conn:
            sql = text("SELECT CAST(:i AS int) FROM pg_sleep(0.05)")
            return int(conn.execute(sql, {"i": i}).scalar_one())

    with make_manager("singleton") as manager, ThreadPoolExecutor(50) as pool:
        assert sorted(pool.map(query, range(50))) == list(range(50))
        stats = only_tunnel(manager)
        assert stats.connects == 1
        if manager.settings.ssh_transport == "paramiko":  # OpenSSH's channels are not counted
            assert stats.forwards[0].channels_opened >= 10
        assert stats.forwards[0].channel_failures == 0


@pytest.mark.parametrize("mode", ["singleton", "new"])
def test_killed_session_restarts_with_the_same_local_port(mode: str, sshd: ThrowawaySshd) -> None:
    db = database(1, bastion(sshd))
    with make_manager(mode) as manager:
        engine = manager.get(db)
        port = engine.url.port
        assert scalar(engine, "SELECT 1") == 1
        assert sshd.kill_sessions() >= 1
        wait_until(
            lambda: only_tunnel(manager).state == "disconnected", what="the drop to be noticed"
        )
        # The next query succeeds: the pooled connection is retired, the transport reopened.
        assert scalar(manager.get(db), "SELECT 1") == 1
        tunnel = only_tunnel(manager)
        assert (tunnel.state, tunnel.restarts) == ("connected", 1)
        assert tunnel.forwards[0].local_port == port
        assert manager.get(db).url.port == port


def test_janitor_round_restarts_a_dropped_session(sshd: ThrowawaySshd) -> None:
    db = database(1, bastion(sshd))
    with make_manager("singleton") as manager:
        assert scalar(manager.get(db), "SELECT 1") == 1
        sshd.kill_sessions()
        wait_until(
            lambda: only_tunnel(manager).state == "disconnected", what="the drop to be noticed"
        )
        manager.sweep()
        wait_until(lambda: only_tunnel(manager).state == "connected", what="the health round")
        assert only_tunnel(manager).restarts == 1


@pytest.mark.parametrize("mode", ["singleton", "new"])
def test_bastion_down_for_good_raises_tunnel_error(mode: str, private_sshd: ThrowawaySshd) -> None:
    db = database(1, bastion(private_sshd))
    name = f"{USER}@127.0.0.1:{private_sshd.port}"
    with make_manager(mode, restart_max=2, restart_backoff=0.01, restart_backoff_max=0.05) as m:
        assert scalar(m.get(db), "SELECT 1") == 1
        private_sshd.stop()
        wait_until(lambda: only_tunnel(m).state == "disconnected", what="the drop to be noticed")
        messages = []
        for _ in range(3):
            with pytest.raises(TunnelError) as caught:
                scalar(m.get(db), "SELECT 1")
            messages.append(str(caught.value))
        assert all(name in message for message in messages)
        assert "gave up" in messages[-1]
        assert only_tunnel(m).state == "failed"
    wait_until(lambda: not tunnel_threads(), what="tunnel threads to end")


def test_shutdown_closes_every_tunnel(sshd: ThrowawaySshd) -> None:
    before = len(sshd.sessions())
    manager = make_manager("singleton")
    assert scalar(manager.get(database(1, bastion(sshd))), "SELECT 1") == 1
    other = bastion(sshd, password=None, private_key=sshd.keys["ed25519"])
    assert scalar(manager.get(database(2, other)), "SELECT 1") == 1
    assert len(manager.stats().tunnels) == 2  # other credentials: another session
    manager.shutdown()
    assert not tunnel_threads()
    sessions_settle(sshd, before)


def test_a_silent_bastion_does_not_hold_the_registry(sshd: ThrowawaySshd) -> None:
    """While one bastion stalls its handshake, other databases still get engines."""
    tarpit = socket.create_server(("127.0.0.1", 0))
    tarpit.settimeout(60)  # never hang the suite if the handshake never starts
    accepted: list[socket.socket] = []
    stalled = database(1, bastion(sshd).model_copy(update={"server_port": tarpit.getsockname()[1]}))
    outcome: list[BaseException] = []
    finished = threading.Event()
    # The stalled handshake may wait up to 60 s (0.3 x ask_timeout): longer than this test.
    with make_manager("singleton", ask_timeout=200, tunnel_connect_timeout=60) as manager:

        def blocked_get() -> None:
            try:
                manager.get(stalled)
            except BaseException as exc:  # recorded for the assertion below
                outcome.append(exc)
            finally:
                finished.set()

        caller = threading.Thread(target=blocked_get, daemon=True)
        caller.start()
        try:
            accepted.append(tarpit.accept()[0])  # the handshake has begun, and now waits
            direct = DatabaseSpec(id=2, uri=PG_URI)
            assert scalar(manager.get(direct), "SELECT 1") == 1
            assert scalar(manager.get(database(3, bastion(sshd))), "SELECT 1") == 1
            assert not finished.is_set()  # the stalled caller was still waiting
        finally:
            for conn in accepted:
                conn.close()
            tarpit.close()
        caller.join(120)
    assert finished.is_set()
    assert len(outcome) == 1 and isinstance(outcome[0], TunnelError)
    assert f"127.0.0.1:{stalled.ssh_tunnel.server_port}" in str(outcome[0])


def test_idle_session_closes_and_reopens_on_the_same_port(sshd: ThrowawaySshd) -> None:
    db = database(1, bastion(sshd), engine_params={"poolclass": "null"})  # no pooled channel
    with make_manager("singleton", tunnel_idle_timeout=0.01) as manager:
        engine = manager.get(db)  # stays cached: its forward stays too
        assert scalar(engine, "SELECT 1") == 1
        wait_until(lambda: only_tunnel(manager).forwards[0].active_channels == 0, what="idle")

        def swept_idle() -> bool:
            manager.sweep()  # a health round; idle once tunnel_idle_timeout has passed
            return only_tunnel(manager).state == "idle"

        wait_until(swept_idle, what="the session to close")
        assert scalar(manager.get(db), "SELECT 1") == 1
        tunnel = only_tunnel(manager)
        assert (tunnel.state, tunnel.connects, tunnel.restarts) == ("connected", 2, 0)
        assert tunnel.forwards[0].local_port == engine.url.port


def test_evicted_database_releases_its_forward(sshd: ThrowawaySshd) -> None:
    before = len(sshd.sessions())
    with make_manager("singleton", idle_timeout=0.01, tunnel_idle_timeout=0.01) as manager:
        assert scalar(manager.get(database(1, bastion(sshd))), "SELECT 1") == 1

        def released() -> bool:
            manager.sweep()  # evicts the idle engine, then (next round) its forward
            return manager.stats().tunnels == []

        wait_until(released, what="the evicted database's tunnel to close")
        wait_until(lambda: not tunnel_threads(), what="tunnel threads to end")
        sessions_settle(sshd, before)


def test_a_failed_create_engine_leaves_no_prepared_plan_behind(sshd: ThrowawaySshd) -> None:
    """Issue 13 item 11: a tunneled plan (its URL holds the password) is not kept forever."""
    import gc

    from enginehouse.actors import tunnel_directory
    from enginehouse.errors import EngineCreationError

    broken = database(31, bastion(sshd), engine_params={"no_such_argument": 1})
    with make_manager("singleton") as manager:
        for _ in range(3):
            with pytest.raises(EngineCreationError):
                manager.get(broken)
        gc.collect()
        assert not [p for p, *_ in tunnel_directory._PREPARED.values() if p() is not None]
        assert tunnel_directory._PREPARED == {}
    wait_until(lambda: not tunnel_threads(), what="tunnel threads to end")
