"""Tunnel reliability (issue 13, items 6, 7, 8, 11): accept errors, silent bastions, no
waiting on a stuck bastion, fork hygiene. Real sshd, real PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import PG_URI
from sqlalchemy import text
from sshd_fixtures import BlackHoleRelay, ThrowawaySshd
from test_tunnel_manager import bastion, database, make_manager, only_tunnel, scalar

from enginehouse import DatabaseSpec, SSHTunnelSpec
from enginehouse.errors import TunnelError

pytestmark = pytest.mark.services("postgres")

HERE = Path(__file__).resolve().parent


def test_listener_keeps_accepting_after_running_out_of_file_descriptors() -> None:
    """Item 6: accept() failing with EMFILE pauses the listener; it never stops for good."""
    child = subprocess.Popen(
        [sys.executable, str(HERE / "forward_fd_child.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None

    def say(line: str) -> str:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(line + "\n")
        child.stdin.flush()
        return child.stdout.readline().strip()

    try:
        port = int(child.stdout.readline().split()[1])
        assert say("exhaust") == "EXHAUSTED"
        client = socket.create_connection(("127.0.0.1", port), timeout=20)
        client.sendall(b"ping")
        # accept() fails (EMFILE) now, or right after serving this client with the fd a
        # blocked accept() held from before: either way the listener sees the error.
        assert say("errors?") == "ERRORS"
        assert say("release") == "RELEASED"
        assert client.recv(4) == b"ping"  # served: accepted once descriptors came back
        client.close()
        with socket.create_connection(("127.0.0.1", port), timeout=20) as later:
            later.sendall(b"pong")
            assert later.recv(4) == b"pong"  # and the listener goes on accepting
    finally:
        child.kill()
        child.wait(10)


def test_a_bastion_that_drops_traffic_silently_is_noticed(sshd: ThrowawaySshd) -> None:
    """Item 7: no reply to keepalives closes the session; a query over it fails, not hangs."""
    relay = BlackHoleRelay(sshd.port)
    db = database(1, bastion(sshd).model_copy(update={"server_port": relay.port}))
    try:
        with make_manager(
            "singleton", tunnel_keepalive_interval=0.2, tunnel_keepalive_timeout=1.0
        ) as manager:
            engine = manager.get(db)
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar() == 1
                relay.stalls_a_query(conn, timeout=30)
            assert only_tunnel(manager).state == "disconnected"
            relay.restore()
            assert scalar(manager.get(db), "SELECT 3") == 3  # a new session, same local port
            tunnel = only_tunnel(manager)
            assert (tunnel.state, tunnel.connects) == ("connected", 2)
    finally:
        relay.close()


def test_stats_answer_while_a_bastion_is_stuck_in_its_handshake(sshd: ThrowawaySshd) -> None:
    """Item 8: stats() (and the metrics scrape) never wait on a tunnel that is busy."""
    tarpit = socket.create_server(("127.0.0.1", 0))
    tarpit.settimeout(60)
    stuck = bastion(sshd).model_copy(update={"server_port": tarpit.getsockname()[1]})
    finished = threading.Event()
    outcome: list[BaseException] = []
    accepted: list[socket.socket] = []
    with make_manager("singleton", ask_timeout=200, tunnel_connect_timeout=60) as manager:

        def blocked_get() -> None:
            try:
                manager.get(database(1, stuck))
            except BaseException as exc:  # recorded for the assertion below
                outcome.append(exc)
            finally:
                finished.set()

        threading.Thread(target=blocked_get, daemon=True).start()
        try:
            accepted.append(tarpit.accept()[0])  # its handshake has begun, and now waits
            assert scalar(manager.get(database(2, bastion(sshd))), "SELECT 1") == 1
            states = {t.bastion: t.state for t in manager.stats().tunnels}
            assert not finished.is_set()  # stats() answered while that bastion was stuck
            assert states == {stuck.bastion: "connecting", bastion(sshd).bastion: "connected"}
        finally:
            for conn in accepted:
                conn.close()
            tarpit.close()
        assert finished.wait(120)
    assert len(outcome) == 1 and isinstance(outcome[0], TunnelError)


def test_registry_prepare_never_asks_a_tunnel() -> None:
    """Item 8: the registry's prepare hook reads what the caller opened; it asks no actor."""
    from enginehouse.actors.tunnel_directory import TunnelPreparer
    from enginehouse.plan import build_plan
    from enginehouse.settings import ManagerSettings

    asked: list[object] = []
    preparer = TunnelPreparer(lambda: asked.append("lookup"), 5.0)
    spec = DatabaseSpec(
        id=7,
        uri=PG_URI,
        ssh_tunnel={"server_address": "10.9.9.9", "username": "u", "password": "p"},
    )
    from enginehouse.messages.registry import RequestKey

    key = RequestKey(7, spec.fingerprint, None, None, None, None)
    plan = build_plan(spec, key, ManagerSettings())
    with pytest.raises(TunnelError, match="closed before its engine was built"):
        preparer(plan)  # nothing was warmed: an error at once, no ask
    assert asked == []


def test_a_forked_child_closes_the_parents_tunnel_sockets(sshd: ThrowawaySshd) -> None:
    """Item 11: the child drops its copies of listeners and SSH sockets; the parent's live on."""
    db = database(1, bastion(sshd))
    with make_manager("singleton") as manager:
        engine = manager.get(db)
        assert scalar(engine, "SELECT 1") == 1
        local_port = int(engine.url.port or 0)
        pid = os.fork()
        if pid == 0:  # the child: count sockets that still listen on / talk to the tunnel
            os._exit(_tunnel_sockets(local_port, sshd.port))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child kept tunnel sockets open"
        assert scalar(engine, "SELECT 2") == 2  # the parent's session was not disturbed
        assert only_tunnel(manager).connects == 1


def _tunnel_sockets(local_port: int, bastion_port: int) -> int:
    """How many of this process's fds are the forward's listener or an SSH socket (max 100)."""
    found = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        with contextlib.suppress(OSError, IndexError, TypeError), sock:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                found += sock.getsockname()[1] == local_port  # the forward's listener
            else:
                found += sock.getpeername()[1] == bastion_port  # an SSH connection
    return min(found, 100)


def test_a_handshake_that_never_completes_is_a_tunnel_error() -> None:
    """Soak finding: a bastion that sends its banner, then nothing, gave paramiko's
    ``SSHException("No existing session")`` to callers instead of a ``TunnelError``."""
    mute = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def banner_then_silence() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = mute.accept()
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                held.append(conn)  # reads nothing, answers nothing, closes nothing

    threading.Thread(target=banner_then_silence, daemon=True).start()
    spec = SSHTunnelSpec(
        server_address="127.0.0.1", server_port=mute.getsockname()[1], username="u", password="p"
    )
    try:
        with make_manager("new", ask_timeout=10, tunnel_connect_timeout=1) as manager:
            with pytest.raises(TunnelError, match="handshake") as caught:
                manager.get(database(1, spec))
            assert spec.bastion in str(caught.value)
    finally:
        mute.close()
        for conn in held:
            conn.close()
