"""Superset config keys -> enginehouse settings; Superset models -> specs (no Superset needed)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from enginehouse.errors import ConfigurationError, InvalidSpecError
from enginehouse.integrations.superset import models
from enginehouse.integrations.superset.config import (
    TunnelOptions,
    manager_settings,
    tunnel_options,
)
from enginehouse.settings import Mode

TUNNEL_PASSWORD = "bastion-pw-8642"


@pytest.fixture(autouse=True)
def _no_mode_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENGINEHOUSE_MODE", raising=False)


@dataclass
class SSHTunnel:
    """The columns of Superset 6.1's SSHTunnel model."""

    server_address: str = "bastion.internal"
    server_port: int = 22
    username: str = "tunnel"
    password: str | None = TUNNEL_PASSWORD
    private_key: str | None = None
    private_key_password: str | None = None
    database_id: int | None = 7


@dataclass
class Database:
    id: int | None = 7
    sqlalchemy_uri_decrypted: str = "postgresql://u:pw-1357@db.internal/sales"
    extra: str | None = None
    encrypted_extra: str | None = None
    impersonate_user: bool = False
    ssh_tunnel: Any = None


def test_mode_defaults_to_new_as_in_superset_seed() -> None:
    assert manager_settings({}).mode is Mode.NEW


@pytest.mark.parametrize("value", ["SINGLETON", "singleton"])
def test_engine_manager_mode_is_honoured(value: str) -> None:
    assert manager_settings({"ENGINE_MANAGER_MODE": value}).mode is Mode.SINGLETON


def test_enginehouse_keys_win_over_superset_keys() -> None:
    settings = manager_settings({"ENGINE_MANAGER_MODE": "NEW", "ENGINEHOUSE_MODE": "singleton"})
    assert settings.mode is Mode.SINGLETON


def test_superset_keys_map_to_settings() -> None:
    settings = manager_settings(
        {
            "ENGINE_MANAGER_CLEANUP_INTERVAL": timedelta(seconds=42),
            "SSH_TUNNEL_TIMEOUT_SEC": 7.5,
            "SSH_TUNNEL_PACKET_TIMEOUT_SEC": 1.0,
            "ENGINEHOUSE_IDLE_TIMEOUT": 120,
            "ENGINEHOUSE_DEFAULT_MAX_CONNECTIONS": 9,
            "ENGINEHOUSE_SSH_KNOWN_HOSTS_FILE": "/etc/ssh/ssh_known_hosts",
        }
    )
    assert settings.cleanup_interval == 42
    assert settings.tunnel_connect_timeout == 7.5
    assert settings.idle_timeout == 120
    assert settings.default_max_connections == 9
    assert str(settings.ssh_known_hosts_file) == "/etc/ssh/ssh_known_hosts"


def test_an_unknown_enginehouse_key_names_itself() -> None:
    with pytest.raises(ConfigurationError, match="ENGINEHOUSE_NO_SUCH_THING"):
        manager_settings({"ENGINEHOUSE_NO_SUCH_THING": 1})


def test_tunnel_options_from_superset_keys(caplog: pytest.LogCaptureFixture) -> None:
    options = tunnel_options(
        {"SSH_TUNNEL_STRICT_HOST_KEY_CHECKING": True, "SSH_TUNNEL_LOCAL_BIND_ADDRESS": "0.0.0.0"}
    )
    assert options.strict_host_keys
    assert options.local_bind_address == "127.0.0.1"  # forwards never listen beyond loopback
    assert "SSH_TUNNEL_LOCAL_BIND_ADDRESS" in caplog.text
    assert not tunnel_options({}).strict_host_keys


def test_tunnel_spec_from_the_model_is_strict_when_asked() -> None:
    spec = models.tunnel_spec(SSHTunnel(), TunnelOptions(strict_host_keys=True))
    assert spec.host_key_policy == "strict"
    assert spec.host_key is None  # known keys: the manager's shared known_hosts file
    assert spec.password is not None and spec.password.get_secret_value() == TUNNEL_PASSWORD
    assert models.tunnel_spec(SSHTunnel(), TunnelOptions()).host_key_policy == "pin-first"


def test_server_host_key_of_newer_models_is_used() -> None:
    @dataclass
    class NewerTunnel(SSHTunnel):
        server_host_key: str | None = (
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
        )

    spec = models.tunnel_spec(NewerTunnel(), TunnelOptions(strict_host_keys=True))
    assert spec.host_key is not None and spec.host_key.startswith("ssh-ed25519 ")


def test_caches_are_keyed_by_digest_never_by_plaintext() -> None:
    database = Database(ssh_tunnel=SSHTunnel(), encrypted_extra=json.dumps({"token": "tok-97531"}))
    models.database_facts(database)
    models.tunnel_spec(database.ssh_tunnel, TunnelOptions())
    for cache in (models._facts, models._tunnels):
        keys = " ".join(cache.keys())
        for secret in ("pw-1357", TUNNEL_PASSWORD, "tok-97531"):
            assert secret not in keys


def test_database_facts_read_the_extra() -> None:
    facts = models.database_facts(
        Database(extra=json.dumps({"engine_params": {"poolclass": "static"}, "max_connections": 3}))
    )
    assert (facts.pool, facts.max_connections, facts.database_id) == ("static", 3, 7)
    seed_shape = models.database_facts(Database(extra=json.dumps({"poolclass": "singleton"})))
    assert seed_shape.pool == "singleton"
    assert models.database_facts(Database(id=None)).database_id == models.UNSAVED


def test_a_changed_password_is_a_new_fingerprint() -> None:
    before = models.database_facts(Database())
    after = models.database_facts(Database(sqlalchemy_uri_decrypted="postgresql://u:new@db/sales"))
    assert before.fingerprint != after.fingerprint


def test_encrypted_extra_texts_are_masked_in_errors() -> None:
    facts = models.database_facts(
        Database(
            encrypted_extra=json.dumps({"engine_params": {"connect_args": {"sslkey": "k-24680"}}})
        )
    )
    assert "k-24680" in facts.redact
    assert "engine_params" not in facts.redact


@pytest.mark.parametrize("cap", [0, "3", True, 2.5])
def test_a_bad_max_connections_names_the_field(cap: Any) -> None:
    with pytest.raises(InvalidSpecError, match=r"extra\.max_connections"):
        models.database_facts(Database(extra=json.dumps({"max_connections": cap})))


def test_the_flask_shim_caches_specs_by_digest() -> None:
    from enginehouse.integrations import flask as shim

    database = Database(ssh_tunnel=SSHTunnel(), encrypted_extra=json.dumps({"token": "tok-86420"}))
    spec = shim.to_spec(database)
    assert shim.to_spec(database) is spec  # cached
    keys = " ".join(shim._specs.keys())
    for secret in ("pw-1357", TUNNEL_PASSWORD, "tok-86420"):
        assert secret not in keys
