"""Issue 13 item 5: secrets in the URI's query string never show (repr, logs, stats, errors).

They leave ``uri`` for the ``query_secrets`` SecretStr at validation, come back
only in ``sqlalchemy_url()``, and every rendering of a URL goes through
``enginehouse.specs.masked_url``.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from conftest import PG_URI
from fleet_fixtures import unique
from secret_scan import assert_no_secret, register_secret
from sqlalchemy import text
from sqlalchemy.engine import make_url

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.errors import EngineCreationError, InvalidSpecError
from enginehouse.specs import is_secret_param, masked_url

SECRET = "q-s3cr3t-value"
OTHER = "q-other-s3cr3t"
register_secret(SECRET, OTHER)

SECRET_PARAMS = [
    "password",
    "sslpassword",
    "sslkey",
    "access_token",
    "token",
    "api_key",
    "apikey",
    "client_secret",
    "credentials_base64",  # BigQuery
    "credentials_info",
    "private_key",  # Snowflake
    "private_key_passphrase",
    "passcode",
    "auth_token",
    "sig",  # Azure SAS
    "JWT",
]


@pytest.mark.parametrize("name", SECRET_PARAMS)
def test_secret_query_parameter_leaves_the_uri(name: str) -> None:
    spec = DatabaseSpec(id=1, uri=f"{PG_URI}?{name}={SECRET}&sslmode=prefer")
    for shown in (spec.uri, repr(spec), str(spec), str(spec.model_dump()), spec.fingerprint):
        assert SECRET not in shown
    assert "sslmode=prefer" in spec.uri  # ordinary parameters stay
    assert spec.sqlalchemy_url().query[name] == SECRET
    assert masked_url(spec.sqlalchemy_url()).count("***") == 1


@pytest.mark.parametrize(
    "name", ["sslmode", "application_name", "options", "authenticator", "charset"]
)
def test_ordinary_parameters_are_shown(name: str) -> None:
    assert not is_secret_param(name)
    assert masked_url(f"{PG_URI}?{name}=visible") == f"{PG_URI}?{name}=visible"


def test_repeated_secret_parameter_keeps_every_value() -> None:
    spec = DatabaseSpec(id=1, uri=f"{PG_URI}?token={SECRET}&token={OTHER}")
    assert SECRET not in repr(spec) and OTHER not in repr(spec)
    assert spec.sqlalchemy_url().query["token"] == (SECRET, OTHER)
    assert masked_url(spec.sqlalchemy_url()).endswith("?token=***&token=***")


def test_a_changed_query_secret_is_a_new_fingerprint() -> None:
    one = DatabaseSpec(id=1, uri=f"{PG_URI}?sslpassword={SECRET}")
    two = DatabaseSpec(id=1, uri=f"{PG_URI}?sslpassword={OTHER}")
    assert one.fingerprint != two.fingerprint
    assert one.uri == two.uri


def test_query_secrets_given_twice_is_refused() -> None:
    with pytest.raises(InvalidSpecError) as info:
        DatabaseSpec(id=1, uri=f"{PG_URI}?token={SECRET}", query_secrets={"token": OTHER})
    assert info.value.field == "uri"
    assert_no_secret(info.value)


def test_masked_url_of_garbage_is_not_the_garbage() -> None:
    assert masked_url(f"not a url {SECRET}") == "<not a valid URL>"


def test_manager_connects_with_query_secrets_and_never_shows_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = unique("eh-qs")
    # Trust authentication ignores the password; libpq accepts both parameters.
    uri = f"{PG_URI}?password={SECRET}&sslpassword={OTHER}&application_name={app}"
    spec = DatabaseSpec(id="qs", uri=uri)
    with caplog.at_level(logging.DEBUG, logger="enginehouse"), EngineManager(
        cleanup_interval=60, ask_timeout=10
    ) as manager:
        with manager.connect(spec) as conn:
            assert conn.execute(text("select current_setting('application_name')")).scalar() == app
        stats = manager.stats()
        shown = stats.engines[0].url
        assert make_url(PG_URI).host in shown and "password=***" in shown
        assert "sslpassword=***" in shown
        assert_no_secret(repr(stats))
    created = [r.getMessage() for r in caplog.records if "created engine" in r.getMessage()]
    assert created and "password=***" in created[0]
    assert_no_secret("\n".join(r.getMessage() for r in caplog.records))


def test_engine_creation_error_masks_query_secrets() -> None:
    def echo_url(url: Any, kwargs: Any, *, user: Any, source: Any) -> Any:
        # A mutator that makes create_engine quote the whole URL in its error.
        return url, {**kwargs, "bad_argument_" + url.query["access_token"]: 1}

    spec = DatabaseSpec(id="qs-error", uri=f"{PG_URI}?access_token={SECRET}")
    with (
        EngineManager(cleanup_interval=60, connection_mutator=echo_url) as manager,
        pytest.raises(EngineCreationError) as info,
    ):
        manager.get(spec)
    assert "***" in str(info.value)
    assert_no_secret(info.value)
