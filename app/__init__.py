"""enginehouse: SQLAlchemy engines, pools and SSH tunnels for many databases at once.

    from enginehouse import engines, EngineManager, DatabaseSpec, SSHTunnelSpec, Mode

Exports load on first access, so ``import enginehouse.errors`` (which the actors do)
stays cheap and free of import cycles.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version
from typing import TYPE_CHECKING, Any

try:
    __version__ = _distribution_version("enginehouse")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from enginehouse.default import DefaultEngines, engines
    from enginehouse.errors import EngineManagerError
    from enginehouse.manager import EngineManager
    from enginehouse.settings import ManagerSettings, Mode
    from enginehouse.specs import DatabaseSpec, SSHTunnelSpec
    from enginehouse.stats import ManagerStats

_EXPORTS = {
    "engines": "enginehouse.default",
    "DefaultEngines": "enginehouse.default",
    "EngineManager": "enginehouse.manager",
    "EngineManagerError": "enginehouse.errors",
    "ManagerSettings": "enginehouse.settings",
    "Mode": "enginehouse.settings",
    "DatabaseSpec": "enginehouse.specs",
    "SSHTunnelSpec": "enginehouse.specs",
    "ManagerStats": "enginehouse.stats",
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
    "__version__",
    "engines",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'enginehouse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
