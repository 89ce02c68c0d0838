"""The OpenSSH transport (``ssh_transport=openssh``, issue 14): a supervised ``ssh -N -M``.

Against the real throwaway sshd: forwards through the master, a restart after the
master or its session dies (same local port), no secret on a command line, in a log
or left on disk. Credentials and host-key policies run on both transports in
test_tunnel_auth.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
import sqlalchemy.exc as sa_exc
from conftest import wait_until
from sqlalchemy import text
from sshd_fixtures import (
    KEY_PASSPHRASE,
    PASSWORD,
    BlackHoleRelay,
    ThrowawaySshd,
    ssh_masters,
    tunnel_threads,
)
from test_fork import in_child
from test_tunnel_actor import select_one, stats
from test_tunnel_manager import bastion, database, make_manager, only_tunnel, scalar

from enginehouse import SSHTunnelSpec
from enginehouse.actors.openssh import OpenSSHMaster
from enginehouse.actors.policy import RestartPolicy
from enginehouse.actors.tunnel_supervisor import TunnelSupervisor
from enginehouse.errors import TunnelError
from enginehouse.messages.tunnel import (
    CheckHealth,
    CloseTunnel,
    EnsureConnected,
    Forwarded,
    OpenForward,
    ReleaseForwards,
)

pytestmark = pytest.mark.services("postgres")

ASK = 15.0


def start(spec: SSHTunnelSpec, **settings: Any) -> pykka.ActorRef[Any]:
    policy = RestartPolicy(max_restarts=5, period=60, backoff=0.01, backoff_max=0.05)
    settings.setdefault("idle_timeout", 600.0)
    return TunnelSupervisor.start(
        spec, policy=policy, connect_timeout=5, ask_timeout=ASK, transport="openssh", **settings
    )


@pytest.fixture
def tunnel(sshd: ThrowawaySshd) -> Iterator[pykka.ActorRef[Any]]:
    ref = start(bastion(sshd))
    yield ref
    with contextlib.suppress(pykka.ActorDeadError):
        ref.ask(CloseTunnel(), timeout=ASK)
    wait_until(lambda: not tunnel_threads(), what=f"tunnel threads to end: {tunnel_threads()}")


def master_of(forwarded: Forwarded) -> OpenSSHMaster:
    master = getattr(forwarded.link, "transport", None)
    assert isinstance(master, OpenSSHMaster), master
    return master


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def test_forwards_through_the_master_and_release_cancels_them(
    tunnel: pykka.ActorRef[Any], sshd: ThrowawaySshd
) -> None:
    forwarded: Forwarded = tunnel.ask(OpenForward("127.0.0.1", 5432, owner=1), timeout=ASK)
    assert select_one(forwarded.local_port) == 1
    again: Forwarded = tunnel.ask(OpenForward("127.0.0.1", 5432, owner=2), timeout=ASK)
    assert again.local_port == forwarded.local_port  # one forward per remote end
    master = master_of(forwarded)
    folder = master.files.dir
    state = stats(tunnel)
    assert (state.state, state.connects) == ("connected", 1)
    assert [(f.remote, f.owners) for f in state.forwards] == [("127.0.0.1:5432", 2)]
    assert tunnel.ask(ReleaseForwards(1), timeout=ASK) == 1
    assert select_one(forwarded.local_port) == 1  # owner 2 still uses it
    assert tunnel.ask(ReleaseForwards(2), timeout=ASK) == 0
    wait_until(lambda: not tunnel.is_alive(), what="supervisor to stop")
    assert master.process.returncode is not None  # the master ended
    assert not folder.exists()  # control socket, known_hosts and log removed
    assert refused(forwarded.local_port)


def test_a_second_remote_is_added_to_the_running_master(
    tunnel: pykka.ActorRef[Any], sshd: ThrowawaySshd
) -> None:
    first: Forwarded = tunnel.ask(OpenForward("127.0.0.1", 5432, owner=1), timeout=ASK)
    second: Forwarded = tunnel.ask(OpenForward("localhost", 5432, owner=2), timeout=ASK)
    assert first.local_port != second.local_port
    assert master_of(first) is master_of(second)  # one SSH session for both
    assert select_one(second.local_port) == 1
    assert tunnel.ask(ReleaseForwards(2), timeout=ASK) == 1
    wait_until(lambda: refused(second.local_port), what="ssh -O cancel to close the port")
    assert select_one(first.local_port) == 1


def test_restarts_when_the_master_dies_on_the_same_port(tunnel: pykka.ActorRef[Any]) -> None:
    forwarded: Forwarded = tunnel.ask(OpenForward("127.0.0.1", 5432, owner=1), timeout=ASK)
    master = master_of(forwarded)
    os.kill(master.process.pid, signal.SIGKILL)
    # Nobody asks: the master's watcher tells the supervisor, which starts a new one.
    wait_until(lambda: stats(tunnel).connects == 2, what="a new master")
    assert master_of(forwarded) is not master
    assert not master.files.dir.exists()
    assert select_one(forwarded.local_port) == 1
    state = stats(tunnel)
    assert (state.state, state.restarts, state.forwards[0].local_port) == (
        "connected",
        1,
        forwarded.local_port,
    )


def test_restarts_when_the_bastion_drops_the_session(
    tunnel: pykka.ActorRef[Any], sshd: ThrowawaySshd
) -> None:
    forwarded: Forwarded = tunnel.ask(OpenForward("127.0.0.1", 5432, owner=1), timeout=ASK)
    master = master_of(forwarded)
    assert sshd.kill_sessions() >= 1
    wait_until(lambda: master.process.returncode is not None, what="the master to exit")
    wait_until(lambda: stats(tunnel).connects == 2, what="a new master")
    assert select_one(forwarded.local_port) == 1


def test_an_engine_survives_a_dead_master(sshd: ThrowawaySshd) -> None:
    with make_manager("singleton", ssh_transport="openssh") as manager:
        db = database(1, bastion(sshd))
        engine = manager.get(db)
        assert scalar(engine, "SELECT 1") == 1
        masters = ssh_masters()
        assert len(masters) == 1
        os.kill(masters[0], signal.SIGKILL)
        wait_until(lambda: only_tunnel(manager).connects == 2, what="a new master")
        # The pooled connection went through the dead master: retired, a new one made.
        assert scalar(engine, "SELECT 2") == 2
        assert only_tunnel(manager).state == "connected"


@pytest.mark.parametrize(
    "credentials",
    [
        {"private_key": "ed25519_passphrase", "private_key_password": KEY_PASSPHRASE},
        {"private_key": "rsa_pem_passphrase", "private_key_password": KEY_PASSPHRASE},
        {"password": PASSWORD},
    ],
    ids=["ed25519-passphrase", "rsa-pem-passphrase", "password"],
)
def test_no_secret_on_a_command_line_in_a_log_or_on_disk(
    sshd: ThrowawaySshd, credentials: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    values = dict(credentials)
    if "private_key" in values:
        values["private_key"] = sshd.keys[values["private_key"]]
        values["password"] = None  # type: ignore[assignment]
    secrets = [PASSWORD, KEY_PASSPHRASE]
    secrets += [line for key in sshd.keys.values() for line in key.splitlines() if len(line) > 20]
    with caplog.at_level(logging.DEBUG), make_manager("new", ssh_transport="openssh") as manager:
        assert scalar(manager.get(database(1, bastion(sshd, **values))), "SELECT 1") == 1
        masters = ssh_masters()
        assert masters
        for pid in masters:
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode()
            assert not any(secret in argv for secret in secrets)  # `ps` shows argv
            folder = Path(argv.split("ControlPath=", 1)[-1].split("\0", 1)[0]).parent
            for line in argv.split("\0"):
                if line.startswith("UserKnownHostsFile="):
                    folder = Path(line.split("=", 1)[1]).parent
            assert folder.name.startswith("enginehouse-ssh-")
            assert oct(folder.stat().st_mode & 0o777) == oct(0o700)
            left = sorted(path.name for path in folder.iterdir())
            assert not {"identity", "password", "askpass"} & set(left), left
        stats_text = repr(manager.stats())
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert not any(secret in logged or secret in stats_text for secret in secrets)
    assert not ssh_masters()  # shut down with the manager


def test_a_bastion_that_stops_answering_ends_the_master(sshd: ThrowawaySshd) -> None:
    """ServerAliveInterval/CountMax stand in for the Heartbeat: a silent bastion is noticed."""
    relay = BlackHoleRelay(sshd.port)
    db = database(1, bastion(sshd).model_copy(update={"server_port": relay.port}))
    try:
        with make_manager(
            "singleton",
            ssh_transport="openssh",
            tunnel_keepalive_interval=1.0,
            tunnel_keepalive_timeout=1.0,
        ) as manager:
            engine = manager.get(db)
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar() == 1
                first = ssh_masters()
                relay.stalls_a_query(conn, timeout=60)
            assert not set(first) & set(ssh_masters())  # that master is gone
            relay.restore()

            def answers() -> bool:
                # Restarts tried while black-holed may still be backing off: ask again.
                try:
                    return bool(scalar(manager.get(db), "SELECT 3") == 3)
                except (TunnelError, sa_exc.DBAPIError):
                    return False

            wait_until(answers, timeout=60, what="a new session once the bastion answers")
    finally:
        relay.close()


def test_an_idle_session_closes_and_reopens_on_the_same_port(sshd: ThrowawaySshd) -> None:
    ref = start(bastion(sshd), idle_timeout=0.001)
    try:
        forwarded: Forwarded = ref.ask(OpenForward("127.0.0.1", 5432, owner=1), timeout=ASK)
        master = master_of(forwarded)
        ref.tell(CheckHealth(time.monotonic() + 60))
        wait_until(lambda: stats(ref).state == "idle", what="the idle session to close")
        assert master.process.returncode is not None and not forwarded.link.active()
        # A deliberate close: no restart was started behind our back.
        assert stats(ref).connects == 1
        ref.ask(EnsureConnected("test"), timeout=ASK)  # what an engine's checkout does
        assert select_one(forwarded.local_port) == 1
        state = stats(ref)
        assert (state.state, state.connects, state.restarts) == ("connected", 2, 0)
    finally:
        ref.ask(CloseTunnel(), timeout=ASK)


def test_a_forked_child_never_ends_the_parents_master(sshd: ThrowawaySshd) -> None:
    with make_manager("singleton", ssh_transport="openssh") as manager:
        db = database(1, bastion(sshd))
        assert scalar(manager.get(db), "SELECT 1") == 1
        masters = ssh_masters()

        def child() -> dict[str, Any]:
            # The child's manager starts a master of its own, used and shut down here.
            value = scalar(manager.get(db), "SELECT 2")
            connects = only_tunnel(manager).connects
            manager.shutdown()
            return {"value": value, "connects": connects}

        assert in_child(child) == {"value": 2, "connects": 1}
        assert ssh_masters() == masters  # the parent's master lives on
        assert scalar(manager.get(db), "SELECT 3") == 3
        tunnel = only_tunnel(manager)
        assert (tunnel.connects, tunnel.restarts) == (1, 0)
