"""``install(app)``: Superset's ``FLASK_APP_MUTATOR`` that puts enginehouse under it."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from enginehouse.integrations.flask import EXTENSION_KEY, EngineManagerExtension
from enginehouse.integrations.superset.config import manager_settings, tunnel_options
from enginehouse.integrations.superset.cooperative import make_psycopg2_cooperative
from enginehouse.integrations.superset.engine_hook import EngineHook, patch
from enginehouse.integrations.superset.ssh import SSHManager

log = logging.getLogger("enginehouse.superset")

STOCK_SSH_MANAGER = "superset.extensions.ssh.SSHManager"


def install(app: Flask) -> None:
    """Serve every engine and SSH tunnel Superset asks for from enginehouse; idempotent.

    Reads the settings from ``app.config`` (see docs/superset.md), starts the
    manager unless ``ENGINE_MANAGER_AUTO_START_CLEANUP`` is False, and patches
    ``superset.models.core`` and Superset's SSH manager (a deployment that set
    its own ``SSH_TUNNEL_MANAGER_CLASS`` keeps it).
    """
    if EXTENSION_KEY in app.extensions:
        return
    EngineManagerExtension().init_app(app, manager_settings(app.config))
    state = installed_state(app)
    make_psycopg2_cooperative()
    from superset.models import core

    patch(core, EngineHook(state.running))
    _install_ssh_manager(app, SSHManager(state.running, tunnel_options(app.config)))
    _feed_stats_logger(app)
    log.info("enginehouse serves Superset's engines (%s mode)", state.settings.mode.value)


def _feed_stats_logger(app: Flask) -> None:
    """Send pool telemetry to Superset's ``STATS_LOGGER`` (not to its do-nothing default)."""
    logger = app.config.get("STATS_LOGGER")
    if logger is None or type(logger).__name__ == "DummyStatsLogger":
        return
    from enginehouse.integrations.stats_logger import feed_stats_logger

    feed_stats_logger(logger)
    log.info("pool telemetry goes to STATS_LOGGER (%s)", type(logger).__name__)


def installed_state(app: Flask) -> Any:
    """The enginehouse state of ``app`` (its ``running()`` manager, ``settings``)."""
    state = app.extensions.get(EXTENSION_KEY)
    if state is None:
        raise RuntimeError("enginehouse.superset.install(app) was not called")
    return state


def _install_ssh_manager(app: Flask, manager: SSHManager) -> None:
    from superset.extensions import ssh_manager_factory

    configured = app.config.get("SSH_TUNNEL_MANAGER_CLASS", STOCK_SSH_MANAGER)
    if configured != STOCK_SSH_MANAGER:
        log.warning(
            "SSH_TUNNEL_MANAGER_CLASS=%s is kept: SSH tunnels are not shared by enginehouse",
            configured,
        )
        return
    ssh_manager_factory._ssh_manager = manager
