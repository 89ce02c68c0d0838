"""Fixtures of the Superset end-to-end suite: one real Superset 6.1.0 for the whole session.

Collected only in the sqla14 stack (scripts/test.sh runs it once per invocation). The variant
under test is ``ENGINEHOUSE_E2E_VARIANT``: ``singleton`` (the default once the integration
``enginehouse.superset`` exists in this repository), ``new``, or ``stock`` (Superset as shipped:
the baseline every enginehouse claim is measured against; the default before the integration).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from secret_scan import register_secret
from service_rule import service_unavailable

from .bastion import LoggingSshd, start_bastion, stop_bastion
from .harness import (
    REDIS_HOST,
    REDIS_PORT,
    ROOT,
    Server,
    SupersetClient,
    SupersetSite,
    SupersetUnavailable,
    Variant,
    celery_ready,
    create_database,
    drop_database,
    superset_site,
)

if os.environ.get("ENGINEHOUSE_STACK") != "sqla14":
    collect_ignore_glob = ["test_*.py"]  # Superset runs on SQLAlchemy 1.4: once, in sqla14

pytestmark = pytest.mark.services("postgres", "mariadb", "redis")

REDIS_DB = 13
"""The Redis database of Superset's Celery broker, results backend and fleet leases."""
PG_PASSWORD = "e2e-pg-pw-7731"
"""Put in database URIs (trust auth ignores it): it must never reach a log."""
ENCRYPTED_PASSWORD = "e2e-enc-pw-5512"
"""Sent inside masked_encrypted_extra: it must never reach a log either."""
register_secret(PG_PASSWORD, ENCRYPTED_PASSWORD)


LEAK_THRESHOLD = 1.0
"""Seconds a checkout may last before enginehouse warns (set on the enginehouse variants)."""

SESSION_TIMEOUT = 1200
"""Seconds for any one test here: the first one's setup builds the venv and starts Superset."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "superset_e2e" in item.nodeid:
            item.add_marker(pytest.mark.timeout(SESSION_TIMEOUT))


def integration_present() -> bool:
    return (ROOT / "app" / "superset.py").exists() or (ROOT / "app" / "superset").is_dir()


@pytest.fixture(scope="session")
def variant() -> Iterator[Variant]:
    mode = os.environ.get("ENGINEHOUSE_E2E_VARIANT") or (
        "singleton" if integration_present() else "stock"
    )
    if mode == "stock":
        yield Variant("stock")
        return
    # Budgets are keyed by Superset's database ids, which every run numbers from 1: a prefix
    # of the run's own keeps two runs (two helpers' suites) from sharing one cap.
    prefix = f"enginehouse-e2e-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    fleet = (
        f'ENGINEHOUSE_FLEET_URL = "redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"\n'
        f'ENGINEHOUSE_FLEET_PREFIX = "{prefix}"\n'
        # test_query_source_reaches_the_pool reads the source off a leak warning.
        f"ENGINEHOUSE_LEAK_DETECTION_THRESHOLD = {LEAK_THRESHOLD}\n"
    )
    yield Variant(f"enginehouse-{mode}", enginehouse_mode=mode, extra_config=fleet)
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
        for key in client.scan_iter(f"*{prefix}*"):
            client.delete(key)


@pytest.fixture(scope="session")
def site(variant: Variant) -> Iterator[SupersetSite]:
    """Superset's venv, metadata database, admin user (one per session).

    Asks for ``variant`` so that the variant's Redis keys are removed after every process
    stopped.
    """
    try:
        with superset_site(Variant("stock"), redis_db=REDIS_DB) as prepared:
            yield prepared
            processes = list(prepared.processes)
    except SupersetUnavailable as exc:
        service_unavailable("superset", str(exc))
    leftovers = [p.name for p in processes if p.group_alive()]
    assert not leftovers, f"processes left running: {leftovers}"


@pytest.fixture(scope="session")
def servers(site: SupersetSite, variant: Variant) -> dict[str, Server]:
    """Started together (their imports overlap): gunicorn gthread, gunicorn gevent, Celery."""
    started = {
        "gthread": site.start_gunicorn(variant, wait=False),
        "gevent": site.start_gunicorn(variant, worker_class="gevent", wait=False),
    }
    celery_ready(site.start_celery(variant, wait=False))
    return started


@pytest.fixture(scope="session")
def server(servers: dict[str, Server], target: Target) -> Server:
    """gunicorn (2 gthread workers, 4 threads each), with the Celery worker (2 processes)."""
    web = servers["gthread"]
    web.wait_healthy()
    warm_up(web, target)
    return web


def warm_up(web: Server, target: Target) -> None:
    """Every worker serves one SQL Lab query first (see Server.warm_up)."""
    _, uri = target(f"warmup_{web.process.popen.pid}")
    with web.client() as client:
        database = client.create_database(f"warmup-{web.process.popen.pid}", uri)
    web.warm_up(database)


@pytest.fixture(scope="session")
def api(server: Server) -> Iterator[SupersetClient]:
    with server.client() as client:
        yield client


@pytest.fixture(scope="session")
def bastions() -> Iterator[dict[str, LoggingSshd]]:
    """Two bastions, one per key kind, so logins count per bastion."""
    started = {kind: start_bastion() for kind in ("rsa", "ed25519")}
    yield started
    for bastion in started.values():
        stop_bastion(bastion)


Target = Callable[[str], tuple[str, str]]


@pytest.fixture(scope="session")
def target() -> Iterator[Target]:
    """``target(label)`` -> (dbname, URI with a password): a PostgreSQL database of its own."""
    made: list[str] = []

    def make(label: str) -> tuple[str, str]:
        name = f"superset_e2e_{label}_{os.getpid()}"
        create_database(name)
        made.append(name)
        return name, f"postgresql://postgres:{PG_PASSWORD}@127.0.0.1:5432/{name}"

    yield make
    for name in made:
        with contextlib.suppress(Exception):
            drop_database(name)


@pytest.fixture
def unique() -> str:
    """A short unique suffix for names Superset keeps (database and dataset names)."""
    return uuid.uuid4().hex[:8]


def pooled(variant: Variant) -> bool:
    """SINGLETON keeps pools: a few sessions per worker instead of one per query."""
    return variant.enginehouse_mode == "singleton"


def shares_tunnels(variant: Variant) -> bool:
    """Both enginehouse modes share one SSH session per bastion per process."""
    return variant.enginehouse_mode is not None
