"""Lifecycle events go to one logger per actor, and never carry the secrets in play."""

from __future__ import annotations

import logging

import pytest
from conftest import PG_URI
from secret_scan import assert_no_secret, register_secret
from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.errors import EngineCreationError

pytestmark = pytest.mark.services("postgres")

PG = PG_URI
PASSWORD = "s3cr3t-pw"
register_secret(PASSWORD)


def test_lifecycle_is_logged_per_actor_without_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="enginehouse")
    spec = DatabaseSpec(id=601, uri=PG.replace("://postgres@", f"://postgres:{PASSWORD}@"))
    broken = DatabaseSpec(
        id=602,
        uri=PG.replace("://postgres@", f"://postgres:{PASSWORD}@"),
        extra={"engine_params": {"no_such_argument": 1}},
    )
    with EngineManager(cleanup_interval=60) as manager:
        with manager.connect(spec) as connection:
            assert connection.execute(text("select 1")).scalar_one() == 1
        with pytest.raises(EngineCreationError) as caught:
            manager.get(broken)
        assert_no_secret(caught.value, what="engine creation error")
        assert manager.dispose(601) == 1

    by_logger: dict[str, list[str]] = {}
    for record in caplog.records:
        by_logger.setdefault(record.name, []).append(record.getMessage())
        assert_no_secret(record.getMessage(), what=f"record of {record.name}")
    assert any("started registry" in m for m in by_logger["enginehouse.supervisor"])
    assert any("created engine for database 601" in m for m in by_logger["enginehouse.registry"])
    assert any("registry stopped" in m for m in by_logger["enginehouse.registry"])
    assert any("shut down" in m for m in by_logger["enginehouse.manager"])
    created = next(m for m in by_logger["enginehouse.registry"] if "database 601" in m)
    assert "***" in created  # the URL is logged with its password masked
