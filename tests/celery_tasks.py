"""Celery app for tests/test_celery.py (imported by the worker subprocess and by the test).

The worker's main process uses the default ``engines`` before it forks its
prefork children, so each child inherits a pool holding a live connection:
the case that breaks fork-unaware engine managers.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_init
from conftest import PG_URI
from sqlalchemy import text

from enginehouse import DatabaseSpec, engines, forking
from enginehouse.integrations import workers

BROKER = os.environ.get("ENGINEHOUSE_TEST_CELERY_BROKER", "redis://127.0.0.1:6379/5")
QUEUE = os.environ.get("ENGINEHOUSE_TEST_CELERY_QUEUE", "enginehouse-test")
PG = PG_URI
SPEC = DatabaseSpec(id=501, uri=PG, extra={"engine_params": {"pool_size": 2}})

celery = Celery("enginehouse_test", broker=BROKER, backend=BROKER)
celery.conf.update(
    task_default_queue=QUEUE,
    result_expires=600,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
workers.install_celery_hooks()


def parent_key() -> str:
    return f"{QUEUE}:parent"


@worker_init.connect
def use_engines_before_forking(**_: Any) -> None:
    """In the worker's main process: open a pooled connection, then record its backend pid."""
    with engines.connect(SPEC) as connection:
        pid = connection.execute(text("select pg_backend_pid()")).scalar_one()
    redis.Redis.from_url(BROKER).set(parent_key(), f"{os.getpid()}:{pid}", ex=600)


@celery.task(name="enginehouse_test.backend")
def backend(hold: float = 0.0) -> dict[str, Any]:
    """Which process and which PostgreSQL backend served this task."""
    with engines.connect(SPEC) as connection:
        pid = connection.execute(text("select pg_backend_pid()")).scalar_one()
        if hold:
            connection.execute(text("select pg_sleep(:s)"), {"s": hold})
    stats = engines.stats()
    return {
        "pid": os.getpid(),
        "backend_pid": pid,
        "generation": forking.state.generation,
        "reset_pid": workers.last_reset.pid,
        "actors_alive": all(actor.alive for actor in stats.actors),
        "engines": stats.engine_count,
    }


@celery.task(name="enginehouse_test.ping")
def ping() -> str:
    return "pong"
