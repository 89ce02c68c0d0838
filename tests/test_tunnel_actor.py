"""TunnelSupervisor by its messages only, against a real sshd forwarding to PostgreSQL."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pykka
import pytest
from conftest import wait_until
from sshd_fixtures import PASSWORD, USER, ThrowawaySshd, tunnel_threads

from enginehouse.actors.policy import RestartPolicy
from enginehouse.actors.tunnel_supervisor import TunnelSupervisor
from enginehouse.errors import TunnelError
from enginehouse.messages.tunnel import (
    CheckHealth,
    CloseTunnel,
    EnsureConnected,
    Forwarded,
    GetTunnelStats,
    OpenForward,
    ReleaseForwards,
    TunnelStats,
)
from enginehouse.specs import SSHTunnelSpec

ASK = 15.0


def start(
    server: ThrowawaySshd, *, idle_timeout: float = 600.0, max_restarts: int = 5
) -> pykka.ActorRef[Any]:
    spec = SSHTunnelSpec(
        server_address="127.0.0.1", server_port=server.port, username=USER, password=PASSWORD
    )
    policy = RestartPolicy(max_restarts=max_restarts, period=60, backoff=0.01, backoff_max=0.05)
    return TunnelSupervisor.start(
        spec, policy=policy, connect_timeout=5, ask_timeout=ASK, idle_timeout=idle_timeout
    )


@pytest.fixture
def tunnel(sshd: ThrowawaySshd) -> Iterator[pykka.ActorRef[Any]]:
    ref = start(sshd)
    yield ref
    # A supervisor left without forwards stops itself: it may be gone by now.
    with contextlib.suppress(pykka.ActorDeadError):
        ref.ask(CloseTunnel(), timeout=ASK)
    no_tunnel_threads()


def no_tunnel_threads() -> None:
    wait_until(lambda: not tunnel_threads(), what=f"tunnel threads to end: {tunnel_threads()}")


def select_one(port: int) -> int:
    with psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", dbname="test", connect_timeout=10
    ) as conn:
        value = conn.execute("SELECT 1").fetchone()
    assert value is not None
    return int(value[0])


def stats(ref: pykka.ActorRef[Any]) -> TunnelStats:
    result: TunnelStats = ref.ask(GetTunnelStats(), timeout=ASK)
    return result


def test_open_forward_relays_postgres(tunnel: pykka.ActorRef[Any]) -> None:
    forwarded: Forwarded = tunnel.ask(OpenForward("127.0.0.1", 5432, owner=1), timeout=ASK)
    assert select_one(forwarded.local_port) == 1
    again: Forwarded = tunnel.ask(OpenForward("127.0.0.1", 5432, owner=2), timeout=ASK)
    assert again.local_port == forwarded.local_port  # one listener per remote end
    state = stats(tunnel)
    assert state.state == "connected"
    assert state.connects == 1
    assert [(f.remote, f.owners) for f in state.forwards] == [("127.0.0.1:5432", 2)]
    assert state.forwards[0].channels_opened >= 1


def test_release_of_last_owner_closes_everything(
    tunnel: pykka.ActorRef[Any], sshd: ThrowawaySshd
) -> None:
    before = len(sshd.sessions())
    forwarded: Forwarded = tunnel.ask(OpenForward("127.0.0.1", 5432, owner=1), timeout=ASK)
    tunnel.ask(OpenForward("127.0.0.1", 5432, owner=2), timeout=ASK)
    assert tunnel.ask(ReleaseForwards(1), timeout=ASK) == 1
    assert select_one(forwarded.local_port) == 1  # owner 2 still uses it
    assert tunnel.ask(ReleaseForwards(2), timeout=ASK) == 0
    wait_until(lambda: not tunnel.is_alive(), what="supervisor to stop")
    no_tunnel_threads()
    wait_until(lambda: len(sshd.sessions()) <= before, what="the SSH session to end")
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", forwarded.local_port), 2):
        pass


def test_local_port_in_use(tunnel: pykka.ActorRef[Any]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(TunnelError, match=f"127.0.0.1:{port}.*in use"):
            tunnel.ask(OpenForward("127.0.0.1", 5432, owner=1, local_port=port), timeout=ASK)
    wait_until(lambda: not tunnel.is_alive(), what="supervisor with no forward to stop")
    no_tunnel_threads()


def test_remote_unreachable_from_bastion(tunnel: pykka.ActorRef[Any]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        closed_port = probe.getsockname()[1]  # closed again when this block ends
    with pytest.raises(TunnelError, match=f"cannot reach 127.0.0.1:{closed_port}"):
        tunnel.ask(OpenForward("127.0.0.1", closed_port, owner=1), timeout=ASK)
    no_tunnel_threads()


def test_dead_transport_reconnects_on_demand_with_same_port(
    tunnel: pykka.ActorRef[Any], sshd: ThrowawaySshd
) -> None:
    forwarded: Forwarded = tunnel.ask(OpenForward("127.0.0.1", 5432, owner=1), timeout=ASK)
    generation = forwarded.link.generation
    assert sshd.kill_sessions() >= 1
    wait_until(lambda: not forwarded.link.active(), what="the transport to notice")
    assert stats(tunnel).state == "disconnected"
    # A new connection to the same local port makes the relay ask for a reconnect.
    assert select_one(forwarded.local_port) == 1
    assert forwarded.link.generation == generation + 1
    state = stats(tunnel)
    assert (state.state, state.restarts, state.forwards[0].local_port) == (
        "connected",
        1,
        forwarded.local_port,
    )


def test_health_round_restarts_a_dead_transport(
    tunnel: pykka.ActorRef[Any], sshd: ThrowawaySshd
) -> None:
    forwarded: Forwarded = tunnel.ask(OpenForward("127.0.0.1", 5432, owner=1), timeout=ASK)
    sshd.kill_sessions()
    wait_until(lambda: not forwarded.link.active(), what="the transport to notice")
    tunnel.tell(CheckHealth(time.monotonic()))
    wait_until(lambda: stats(tunnel).connects == 2, what="the health round to reconnect")
    assert forwarded.link.active()
    assert select_one(forwarded.local_port) == 1


def test_idle_transport_closes_and_reopens_on_demand(sshd: ThrowawaySshd) -> None:
    ref = start(sshd, idle_timeout=0.001)
    try:
        forwarded: Forwarded = ref.ask(OpenForward("127.0.0.1", 5432, owner=1), timeout=ASK)
        ref.tell(CheckHealth(time.monotonic() + 60))
        wait_until(lambda: stats(ref).state == "idle", what="the idle transport to close")
        assert not forwarded.link.active()
        assert select_one(forwarded.local_port) == 1  # same port, session reopened
        state = stats(ref)
        assert (state.state, state.connects, state.restarts) == ("connected", 2, 0)
    finally:
        ref.ask(CloseTunnel(), timeout=ASK)


def test_gives_up_when_bastion_stays_down(private_sshd: ThrowawaySshd) -> None:
    ref = start(private_sshd, max_restarts=2)
    try:
        forwarded: Forwarded = ref.ask(OpenForward("127.0.0.1", 5432, owner=1), timeout=ASK)
        private_sshd.stop()
        wait_until(lambda: not forwarded.link.active(), what="the transport to notice")
        errors = []
        for _ in range(3):
            with pytest.raises(TunnelError) as caught:
                ref.ask(EnsureConnected("test"), timeout=ASK)
            errors.append(str(caught.value))
        bastion = f"{USER}@127.0.0.1:{private_sshd.port}"
        assert all(bastion in error for error in errors)
        assert "cannot reach bastion" in errors[0]
        assert "gave up" in errors[-1]
        state = stats(ref)
        assert state.state == "failed"
        assert state.gave_up is not None and "cannot reach bastion" in state.gave_up
        # The listener stays (engines keep their port); a connection is refused cleanly.
        with pytest.raises(psycopg.OperationalError):
            select_one(forwarded.local_port)
    finally:
        ref.ask(CloseTunnel(), timeout=ASK)
    no_tunnel_threads()
