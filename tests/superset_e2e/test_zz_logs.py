"""Last: nothing Superset, gunicorn or Celery logged during the session holds a secret."""

from __future__ import annotations

import pytest
from secret_scan import leaked

from .harness import Server, SupersetSite

pytestmark = pytest.mark.services("postgres", "redis")


def test_no_secret_in_any_log(site: SupersetSite, server: Server) -> None:
    logs = site.logs()
    assert any(name.startswith("gunicorn") for name in logs)
    found = {name: leaked(text) for name, text in logs.items() if leaked(text)}
    assert not found, f"secrets (indices) in logs: {found}"
