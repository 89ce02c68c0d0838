"""Host keys (issue 13, item 10): known_hosts lines as OpenSSH writes them, a pin file
shared by processes, written only after authentication, never a key of another host."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from pathlib import Path
from typing import Any

import paramiko
import pytest
from sqlalchemy import text
from sshd_fixtures import PASSWORD, ThrowawaySshd
from test_tunnel_manager import bastion, database, make_manager

from enginehouse import SSHTunnelSpec
from enginehouse.actors.host_keys import pin_host_key, verify_host_key
from enginehouse.errors import TunnelError

pytestmark = pytest.mark.services("postgres")



def new_key() -> paramiko.PKey:
    return paramiko.ECDSAKey.generate()


def spec(**values: Any) -> SSHTunnelSpec:
    values.setdefault("password", "x")
    return SSHTunnelSpec(server_address="10.1.2.3", server_port=2222, username="u", **values)


def line(name: str, key: paramiko.PKey, marker: str = "") -> str:
    return f"{marker}{' ' if marker else ''}{name} {key.get_name()} {key.get_base64()}"


# -- parsing and matching (no server needed) ---------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["[10.1.2.3]:2222", "ssh-gw,[10.1.2.3]:2222", "hashed"],
    ids=["host-port", "alias-list", "hashed"],
)
def test_lines_naming_the_bastion_are_accepted(name: str) -> None:
    key = new_key()
    if name == "hashed":
        name = paramiko.HostKeys.hash_host("[10.1.2.3]:2222")
    for policy in ("strict", "pin-first"):
        assert verify_host_key(spec(host_key=line(name, key), host_key_policy=policy), key, None)\
            is False  # known: nothing to pin


def test_a_bare_key_means_this_bastion() -> None:
    key = new_key()
    bare = f"{key.get_name()} {key.get_base64()} comment"
    assert verify_host_key(spec(host_key=bare, host_key_policy="strict"), key, None) is False


def test_an_alias_line_parses_but_is_not_this_bastions_key() -> None:
    key = new_key()
    alias = spec(host_key=line("ssh-gw", key), host_key_policy="strict")
    with pytest.raises(TunnelError, match=r"no key for bastion .*ssh-gw"):
        verify_host_key(alias, key, None)


def test_a_listed_key_for_another_host_is_refused(tmp_path: Path) -> None:
    """Before: when no line named the bastion, any listed key was accepted."""
    key = new_key()
    other = spec(host_key=line("[10.9.9.9]:22", key), host_key_policy="pin-first")
    with pytest.raises(TunnelError, match="no key for bastion"):
        verify_host_key(other, key, None)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(line("[10.9.9.9]:22", key) + "\n")
    with pytest.raises(TunnelError, match=r"unknown .* strict"):
        verify_host_key(spec(host_key_policy="strict"), key, known_hosts)


def test_markers_revoked_refuses_and_cert_authority_vouches_for_nothing(tmp_path: Path) -> None:
    key = new_key()
    revoked = "\n".join([line("[10.1.2.3]:2222", key), line("[10.1.2.3]:2222", key, "@revoked")])
    with pytest.raises(TunnelError, match="@revoked"):
        verify_host_key(spec(host_key=revoked), key, None)
    authority = line("[10.1.2.3]:2222", key, "@cert-authority")
    with pytest.raises(TunnelError, match="no key for bastion"):
        verify_host_key(spec(host_key=authority, host_key_policy="strict"), key, None)


def test_strict_reads_the_known_hosts_file(tmp_path: Path) -> None:
    key = new_key()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"# comment\nnot a line\n{line('[10.1.2.3]:2222', key)}\n")
    assert verify_host_key(spec(host_key_policy="strict"), key, known_hosts) is False
    with pytest.raises(TunnelError, match="changed"):
        verify_host_key(spec(host_key_policy="strict"), new_key(), known_hosts)


def test_pin_first_pins_in_the_file_and_refuses_a_change(tmp_path: Path) -> None:
    key, known_hosts = new_key(), tmp_path / "state" / "known_hosts"
    assert verify_host_key(spec(), key, known_hosts) is True  # unknown: pin after auth
    pin_host_key(spec(), key, known_hosts)
    assert known_hosts.read_text() == line("[10.1.2.3]:2222", key) + "\n"
    assert verify_host_key(spec(), key, known_hosts) is False
    with pytest.raises(TunnelError, match=r"changed.*pin-first"):
        verify_host_key(spec(), new_key(), known_hosts)


def _pin_in_a_process(path: str, blob: str) -> str:
    key = paramiko.ECDSAKey(data=bytes.fromhex(blob))
    try:
        pin_host_key(spec(), key, Path(path))
    except TunnelError as exc:
        return f"refused: {exc}"
    return "pinned"


def test_processes_pinning_at_once_agree_on_one_key(tmp_path: Path) -> None:
    """Each pins a different key at the same time: one line is written, the others refused."""
    known_hosts = tmp_path / "known_hosts"
    keys = [new_key() for _ in range(4)]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(4, mp_context=context) as pool:
        outcomes = list(
            pool.map(_pin_in_a_process, [str(known_hosts)] * 4, [k.asbytes().hex() for k in keys])
        )
    assert outcomes.count("pinned") == 1, outcomes
    assert all("changed" in outcome for outcome in outcomes if outcome != "pinned")
    assert len(known_hosts.read_text().splitlines()) == 1


# -- against the real sshd ------------------------------------------------------------------


def test_pins_are_shared_by_managers_and_survive_them(
    private_sshd: ThrowawaySshd, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts"
    db = database(1, bastion(private_sshd))
    with make_manager("new", ssh_known_hosts_file=known_hosts) as first, first.connect(db) as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
    assert known_hosts.read_text().strip() == private_sshd.host_key_line
    private_sshd.stop()
    private_sshd.new_host_key()
    private_sshd.start()
    with (
        make_manager("new", ssh_known_hosts_file=known_hosts) as second,  # another "worker"
        pytest.raises(TunnelError, match=r"changed.*ssh_known_hosts_file"),
    ):
        second.get(db)


def test_a_failed_authentication_pins_nothing(sshd: ThrowawaySshd, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    wrong = bastion(sshd, password=PASSWORD + "-wrong")
    with (
        make_manager("new", ssh_known_hosts_file=known_hosts) as manager,
        pytest.raises(TunnelError, match="authentication failed"),
    ):
        manager.get(database(1, wrong))
    assert not known_hosts.exists() or known_hosts.read_text() == ""


def test_an_unwritable_pin_file_pins_in_the_process(tmp_path: Path) -> None:
    """A read-only state directory must not take tunnels down: the pin stays in memory."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    known_hosts = blocker / "known_hosts"  # its parent is a file: cannot be created
    key = new_key()
    pinned = spec().model_copy(update={"server_address": "10.7.7.7"})
    pin_host_key(pinned, key, known_hosts)
    with pytest.raises(TunnelError, match="changed"):
        verify_host_key(pinned, new_key(), None)  # the in-process pin holds
