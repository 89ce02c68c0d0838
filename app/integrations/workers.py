"""Pre-fork servers: gunicorn ``post_fork`` and Celery ``worker_process_init`` one-liners.

Fork safety needs no hook: every child notices the fork (enginehouse.forking) and
its managers rebuild their actors and drop inherited pools on first use.
These hooks only make that happen at once, explicitly and logged, so the
first request of a child does not pay for it, and stop the child's
managers cleanly when the child exits.

gunicorn.conf.py::

    # gunicorn finds them by name:
    from enginehouse.integrations.workers import child_exit, post_fork, worker_exit  # noqa: F401

Celery (in the module that creates the Celery app)::

    from enginehouse.integrations.workers import install_celery_hooks
    install_celery_hooks()
"""

from __future__ import annotations

import logging
import os
from typing import Any

from enginehouse import forking
from enginehouse.manager import EngineManager, _live_managers

log = logging.getLogger("enginehouse.workers")


class _Resets:
    """Which process last ran :func:`after_fork` (tests and logs read it)."""

    __slots__ = ("generation", "managers", "pid")

    def __init__(self) -> None:
        self.pid: int | None = None
        self.generation: int | None = None
        self.managers = 0


last_reset = _Resets()


def after_fork(*managers: EngineManager) -> int:
    """Rebuild, now, the actor systems of ``managers`` (default: every live manager).

    Returns how many managers were rebuilt. Safe in a process that did not
    fork (nothing to rebuild then) and idempotent.
    """
    targets = list(managers) or list(_live_managers)
    rebuilt = 0
    for manager in targets:
        if manager.closed:
            continue
        manager.stats()  # the first call in a new generation starts a fresh actor system
        rebuilt += 1
    last_reset.pid = os.getpid()
    last_reset.generation = forking.state.generation
    last_reset.managers = rebuilt
    log.info(
        "process %d (fork generation %d): %d engine manager(s) ready",
        os.getpid(),
        forking.state.generation,
        rebuilt,
    )
    return rebuilt


def shutdown_all() -> int:
    """Shut down every live manager of this process (a worker about to exit)."""
    managers = [m for m in list(_live_managers) if not m.closed]
    for manager in managers:
        manager.shutdown()
    log.info("process %d: %d engine manager(s) shut down", os.getpid(), len(managers))
    return len(managers)


# -- gunicorn -----------------------------------------------------------------


def post_fork(server: Any, worker: Any) -> None:
    """gunicorn hook: ``post_fork = enginehouse.integrations.workers.post_fork``."""
    after_fork()


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn hook: ``worker_exit = enginehouse.integrations.workers.worker_exit``."""
    shutdown_all()


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook, run in the master: ``child_exit = ...workers.child_exit``.

    Under prometheus_client's multiprocess mode, drops the dead worker's live
    gauges from the shared directory; otherwise does nothing.
    """
    _mark_dead(worker.pid)


# -- Celery -------------------------------------------------------------------


def celery_worker_process_init(**_signal: Any) -> None:
    """Receiver for ``celery.signals.worker_process_init`` (each prefork child)."""
    after_fork()


def celery_worker_process_shutdown(**_signal: Any) -> None:
    """Receiver for ``celery.signals.worker_process_shutdown``."""
    shutdown_all()
    _mark_dead(os.getpid())


def _mark_dead(pid: int) -> None:
    """Forget ``pid``'s live metric gauges when metrics run in multiprocess mode."""
    legacy = os.environ.get("prometheus_multiproc_dir")  # noqa: SIM112 (the legacy name)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") or legacy:
        from enginehouse.integrations.metrics import mark_process_dead

        mark_process_dead(pid)


def install_celery_hooks() -> None:
    """Connect both receivers to Celery's signals (idempotent)."""
    from celery.signals import worker_process_init, worker_process_shutdown

    worker_process_init.connect(celery_worker_process_init, weak=False)
    worker_process_shutdown.connect(celery_worker_process_shutdown, weak=False)
