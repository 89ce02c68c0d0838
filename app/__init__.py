"""enginehouse: SQLAlchemy engines, pools and SSH tunnels for many databases at once.

    from app import engines, EngineManager, DatabaseSpec, SSHTunnelSpec, Mode

Exports load on first access, so ``import app.errors`` (which the actors do)
stays cheap and free of import cycles.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.default import DefaultEngines, engines
    from app.errors import EngineManagerError
    from app.manager import EngineManager
    from app.settings import ManagerSettings, Mode
    from app.specs import DatabaseSpec, SSHTunnelSpec
    from app.stats import ManagerStats

_EXPORTS = {
    "engines": "app.default",
    "DefaultEngines": "app.default",
    "EngineManager": "app.manager",
    "EngineManagerError": "app.errors",
    "ManagerSettings": "app.settings",
    "Mode": "app.settings",
    "DatabaseSpec": "app.specs",
    "SSHTunnelSpec": "app.specs",
    "ManagerStats": "app.stats",
}

__all__ = [
    "DatabaseSpec",
    "DefaultEngines",
    "EngineManager",
    "EngineManagerError",
    "ManagerSettings",
    "ManagerStats",
    "Mode",
    "SSHTunnelSpec",
    "engines",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'app' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
