"""Credentials, host key policies and bad input, each against a real sshd, on both transports
(``ssh_transport``: paramiko, and openssh's supervised ``ssh -N -M``)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import wait_until
from sqlalchemy import text
from sshd_fixtures import KEY_PASSPHRASE, KNOWN_HOSTS, PASSWORD, USER, ThrowawaySshd, tunnel_threads
from test_tunnel_manager import bastion, database, make_manager

from enginehouse import EngineManager
from enginehouse.compat import postgres_uri
from enginehouse.errors import InvalidSpecError, TunnelError

pytestmark = pytest.mark.services("postgres")


@pytest.fixture(params=["paramiko", "openssh"])
def transport(request: pytest.FixtureRequest) -> str:
    """The ``ssh_transport`` setting every test of this module runs with."""
    return str(request.param)


@pytest.fixture
def manager(transport: str) -> Iterator[EngineManager]:
    with make_manager("new", ssh_transport=transport) as m:
        yield m


def select_one(manager: EngineManager, **tunnel: Any) -> int:
    server: ThrowawaySshd = tunnel.pop("server")
    with manager.connect(database(1, bastion(server, **tunnel))) as conn:
        return int(conn.execute(text("SELECT 1")).scalar_one())


def assert_nothing_left(manager: EngineManager, server: ThrowawaySshd, sessions: int) -> None:
    assert manager.stats().tunnels == []
    wait_until(lambda: not tunnel_threads(), what="tunnel threads to end")
    wait_until(lambda: len(server.sessions()) <= sessions, what="no extra SSH session")


def assert_no_secret(message: str, server: ThrowawaySshd) -> None:
    for secret in (PASSWORD, KEY_PASSPHRASE, *server.keys.values()):
        assert secret not in message


@pytest.mark.parametrize(
    "credentials",
    [
        {"private_key": "ed25519"},
        {"private_key": "ecdsa"},
        {"private_key": "rsa"},
        {"private_key": "rsa_pem_passphrase", "private_key_password": KEY_PASSPHRASE},
        {"private_key": "ed25519_passphrase", "private_key_password": KEY_PASSPHRASE},
        {"password": PASSWORD},
    ],
    ids=["ed25519", "ecdsa", "rsa", "rsa-pem-passphrase", "ed25519-passphrase", "password"],
)
def test_every_key_type_and_password(
    manager: EngineManager, sshd: ThrowawaySshd, credentials: dict[str, str]
) -> None:
    values = dict(credentials)
    if "private_key" in values:
        values["private_key"] = sshd.keys[values["private_key"]]
        values["password"] = None  # type: ignore[assignment]
    assert select_one(manager, server=sshd, **values) == 1
    assert manager.stats().tunnels[0].connects == 1


BAD_INPUTS: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
    "wrong-password": (
        {"password": "not-the-password"},
        TunnelError,
        "authentication failed at bastion",
    ),
    "unauthorized-key": (
        {"password": None, "private_key": "stranger"},
        TunnelError,
        "authentication failed at bastion",
    ),
    "encrypted-key-without-passphrase": (
        {"password": None, "private_key": "ed25519_passphrase"},
        InvalidSpecError,
        "encrypted: give its passphrase",
    ),
    "wrong-passphrase": (
        {"password": None, "private_key": "rsa_pem_passphrase", "private_key_password": "nope!"},
        InvalidSpecError,
        "wrong passphrase",
    ),
    "malformed-key": (
        {"password": None, "private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n"},
        InvalidSpecError,
        "not a private key paramiko can read",
    ),
    "malformed-host-key": (
        {"host_key": "[127.0.0.1]:22 ssh-ed25519 not-base64!", "host_key_policy": "strict"},
        InvalidSpecError,
        "host_key",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_clearly_and_leaves_nothing(
    manager: EngineManager, sshd: ThrowawaySshd, case: str
) -> None:
    values, error, message = BAD_INPUTS[case]
    values = dict(values)
    if values.get("private_key") in sshd.keys:
        values["private_key"] = sshd.keys[values["private_key"]]
    sessions = len(sshd.sessions())
    with pytest.raises(error, match=message) as caught:
        select_one(manager, server=sshd, **values)
    text_of_error = str(caught.value)
    if error is TunnelError:
        assert f"{USER}@127.0.0.1:{sshd.port}" in text_of_error
    assert_no_secret(text_of_error, sshd)
    assert_nothing_left(manager, sshd, sessions)


def test_unreachable_bastion(manager: EngineManager, sshd: ThrowawaySshd) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # nothing listens there once closed
    down = database(1, bastion(sshd).model_copy(update={"server_port": port}))
    with pytest.raises(TunnelError, match=f"cannot reach bastion {USER}@127.0.0.1:{port}"):
        manager.get(down)
    assert_nothing_left(manager, sshd, len(sshd.sessions()))


def test_remote_unreachable_from_bastion(manager: EngineManager, sshd: ThrowawaySshd) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    spec = database(1, bastion(sshd)).model_copy(
        update={"uri": postgres_uri(f"postgres@127.0.0.1:{port}/test")}
    )
    with pytest.raises(TunnelError, match=f"cannot reach 127.0.0.1:{port}"):
        manager.get(spec)
    assert_nothing_left(manager, sshd, len(sshd.sessions()))


def test_strict_accepts_the_known_key(manager: EngineManager, sshd: ThrowawaySshd) -> None:
    assert (
        select_one(manager, server=sshd, host_key=sshd.host_key_line, host_key_policy="strict") == 1
    )


def test_strict_accepts_a_known_hosts_file(
    manager: EngineManager, sshd: ThrowawaySshd, tmp_path: Any
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"# comment\n{sshd.host_key_line}\n")
    assert (
        select_one(manager, server=sshd, host_key=str(known_hosts), host_key_policy="strict") == 1
    )


def test_strict_refuses_an_unknown_key(sshd: ThrowawaySshd, tmp_path: Any, transport: str) -> None:
    # A known_hosts file of its own: the shared one may hold a pin-first pin of this server.
    with make_manager(
        "new", ssh_known_hosts_file=tmp_path / "known_hosts", ssh_transport=transport
    ) as manager:
        with pytest.raises(TunnelError, match=r"unknown .* host_key_policy is strict"):
            select_one(manager, server=sshd, host_key_policy="strict")
        assert_nothing_left(manager, sshd, len(sshd.sessions()))
    assert not (tmp_path / "known_hosts").exists()  # strict never pins


@pytest.mark.parametrize("policy", ["strict", "pin-first"])
def test_host_key_mismatch_is_refused(
    manager: EngineManager, private_sshd: ThrowawaySshd, policy: str
) -> None:
    old_line = private_sshd.host_key_line
    private_sshd.stop()
    private_sshd.new_host_key()
    private_sshd.start()
    with pytest.raises(TunnelError, match="host key mismatch") as caught:
        select_one(manager, server=private_sshd, host_key=old_line, host_key_policy=policy)
    assert "SHA256:" in str(caught.value)
    assert_nothing_left(manager, private_sshd, 0)


def test_pin_first_refuses_a_changed_key(
    manager: EngineManager, private_sshd: ThrowawaySshd
) -> None:
    assert select_one(manager, server=private_sshd) == 1  # pins the first key seen
    pins = KNOWN_HOSTS.read_text().splitlines()
    assert private_sshd.host_key_line in pins  # pinned in the file every process reads
    manager.dispose(1)
    private_sshd.stop()
    private_sshd.new_host_key()
    private_sshd.start()
    with pytest.raises(TunnelError, match=r"changed.*pin-first"):
        select_one(manager, server=private_sshd)
    assert_nothing_left(manager, private_sshd, 0)


def test_accept_connects_and_warns(
    sshd: ThrowawaySshd, caplog: pytest.LogCaptureFixture, tmp_path: Any, transport: str
) -> None:
    # A known_hosts file of its own: a key listed there would be verified, not warned about.
    with (
        make_manager(
            "new", ssh_known_hosts_file=tmp_path / "known_hosts", ssh_transport=transport
        ) as manager,
        caplog.at_level(logging.WARNING, logger="enginehouse.tunnel"),
    ):
        assert select_one(manager, server=sshd, host_key_policy="accept") == 1
    warnings = [r.getMessage() for r in caplog.records if "host_key_policy=accept" in r.message]
    assert warnings and f"127.0.0.1:{sshd.port}" in warnings[0]
