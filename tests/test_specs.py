"""DatabaseSpec / SSHTunnelSpec validation, password masking, fingerprints, plans and keys."""

from __future__ import annotations

import pytest
from pydantic import SecretStr
from sqlalchemy import pool as sa_pool

from enginehouse.errors import InvalidSpecError
from enginehouse.plan import build_plan, request_key
from enginehouse.settings import ManagerSettings
from enginehouse.specs import DatabaseSpec, SSHTunnelSpec

pytestmark = pytest.mark.services("postgres")

PASSWORD = "s3cr3t-pw"
URI = f"postgresql+psycopg://alice:{PASSWORD}@127.0.0.1:5432/test"


def test_password_moves_out_of_uri_and_is_masked() -> None:
    spec = DatabaseSpec(id=1, uri=URI)
    assert PASSWORD not in spec.uri
    assert PASSWORD not in repr(spec)
    assert PASSWORD not in str(spec.model_dump())
    assert spec.password is not None and spec.password.get_secret_value() == PASSWORD
    assert spec.sqlalchemy_url().password == PASSWORD
    assert spec.backend == "postgresql"


def test_password_twice_is_refused() -> None:
    with pytest.raises(InvalidSpecError) as info:
        DatabaseSpec(id=1, uri=URI, password=SecretStr("other"))
    assert PASSWORD not in str(info.value)


def test_extra_accepts_a_json_string() -> None:
    spec = DatabaseSpec.model_validate(
        {"id": 1, "uri": "sqlite://", "extra": '{"engine_params": {"pool_size": 3}}'}
    )
    assert spec.extra == {"engine_params": {"pool_size": 3}}
    assert spec.engine_params == {"pool_size": 3}


def test_engine_params_is_a_copy() -> None:
    spec = DatabaseSpec(id=1, uri="sqlite://", extra={"engine_params": {"connect_args": {}}})
    spec.engine_params["connect_args"]["x"] = 1
    assert spec.engine_params == {"connect_args": {}}


def test_spec_is_frozen() -> None:
    spec = DatabaseSpec(id=1, uri="sqlite://")
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        spec.uri = "sqlite:///other"


def test_fingerprint_changes_with_password_and_extra() -> None:
    base = DatabaseSpec(id=1, uri=URI)
    assert base.fingerprint == DatabaseSpec(id=1, uri=URI).fingerprint
    other_pw = DatabaseSpec(id=1, uri=URI.replace(PASSWORD, "other"))
    other_extra = DatabaseSpec(id=1, uri=URI, extra={"engine_params": {"pool_size": 2}})
    assert len({base.fingerprint, other_pw.fingerprint, other_extra.fingerprint}) == 3
    assert PASSWORD not in base.fingerprint


def test_unknown_field_is_refused() -> None:
    with pytest.raises(InvalidSpecError) as info:
        DatabaseSpec.model_validate({"id": 1, "uri": "sqlite://", "colour": "red"})
    assert info.value.field == "colour"


def test_engine_params_not_an_object() -> None:
    with pytest.raises(InvalidSpecError) as info:
        DatabaseSpec(id=1, uri="sqlite://", extra={"engine_params": [1]})
    assert "engine_params" in str(info.value)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"pool_size": "five"}, "extra.engine_params.pool_size"),
        ({"pool_timeout": -1}, "extra.engine_params.pool_timeout"),
        ({"poolclass": "null", "pool_size": 3}, "extra.engine_params.pool_size"),
        ({"connect_args": "x"}, "extra.engine_params.connect_args"),
    ],
)
def test_engine_params_checked(params: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidSpecError) as info:
        DatabaseSpec(id=1, uri="sqlite://", extra={"engine_params": params})
    assert info.value.field == field


def test_ssh_tunnel_needs_a_credential_and_masks_it() -> None:
    with pytest.raises(InvalidSpecError):
        SSHTunnelSpec(server_address="bastion", username="u")
    tunnel = SSHTunnelSpec(server_address="bastion", username="u", password=SecretStr(PASSWORD))
    assert PASSWORD not in repr(tunnel)
    assert tunnel.bastion == "u@bastion:22"
    other = SSHTunnelSpec(server_address="bastion", username="u", password=SecretStr("x"))
    assert tunnel.fingerprint != other.fingerprint


def test_request_key_ignores_user_and_source_unless_they_matter() -> None:
    settings = ManagerSettings.build()
    plain = DatabaseSpec(id=1, uri="postgresql+psycopg://u@h/db")
    key = request_key(plain, settings, catalog=None, schema="s", user="bob", source="sql_lab")
    assert key.user is None and key.source is None and key.schema == "s"
    impersonating = DatabaseSpec(id=1, uri="postgresql+psycopg://u@h/db", impersonate_user=True)
    key = request_key(impersonating, settings, catalog=None, schema=None, user="bob", source="x")
    assert key.user == "bob" and key.source is None


def test_plan_places_catalog_schema_user_for_postgres() -> None:
    settings = ManagerSettings.build()
    spec = DatabaseSpec(id=1, uri="postgresql+psycopg://u@h/db", impersonate_user=True)
    key = request_key(spec, settings, catalog="cat", schema="my schema", user="bob", source=None)
    plan = build_plan(spec, key, settings)
    assert plan.url.database == "cat"
    assert plan.url.username == "bob"
    assert plan.kwargs["connect_args"]["options"] == '-csearch_path="my\\ schema"'


def test_plan_pool_class_by_mode() -> None:
    spec = DatabaseSpec(id=1, uri="sqlite://", extra={"engine_params": {"poolclass": "static"}})
    for mode, expected in (("singleton", sa_pool.StaticPool), ("new", sa_pool.NullPool)):
        settings = ManagerSettings.build(mode=mode)
        key = request_key(spec, settings, catalog=None, schema=None, user=None, source=None)
        assert build_plan(spec, key, settings).kwargs["poolclass"] is expected


def test_plan_repr_masks_password() -> None:
    settings = ManagerSettings.build()
    spec = DatabaseSpec(id=1, uri=URI)
    key = request_key(spec, settings, catalog=None, schema=None, user=None, source=None)
    plan = build_plan(spec, key, settings)
    assert plan.url.password == PASSWORD
    assert PASSWORD not in repr(plan)


@pytest.mark.parametrize("host_key", ["~no-such-user-zz/known_hosts", "/proc/self/mem"])
def test_unreadable_host_key_file_names_the_field(host_key: str) -> None:
    """Found by fuzzing: ``~unknownuser`` raised a bare RuntimeError from pathlib."""
    spec = SSHTunnelSpec(server_address="h", username="u", password="pw", host_key=host_key)
    with pytest.raises(InvalidSpecError) as info:
        spec.host_key_lines()
    assert info.value.field == "ssh_tunnel.host_key"
