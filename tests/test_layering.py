"""The dependency rule, checked on the AST (like test_no_locks):

    core vocabulary <- messages <- actors <- facade <- integrations and CLI

A module may import its own layer and the layers to its left, never one to
its right. Every import counts, including those inside functions and under
``TYPE_CHECKING``: messages import nothing from actors, not even for types.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"enginehouse": ROOT / "app", "enginehouse.actors": ROOT / "actors",
           "enginehouse.messages": ROOT / "messages"}
ORDER = ("core", "messages", "actors", "facade", "edge")

CORE = {
    "adapters", "budgeted_pool", "compat", "credentials", "errors", "fleet", "fleet_clients",
    "forking", "ledger",
    "safety", "settings", "shares", "single_flight", "specs",
}
"""Vocabulary and strategies everyone shares: they import only each other."""
FACADE = {"__init__", "budget_client", "default", "leaks", "manager", "plan", "stats"}
"""What callers use: it starts the actors and turns their futures into values."""
EDGE_PACKAGES = {"integrations", "cli", "superset"}
"""Integrations (Flask/Superset, ASGI, gunicorn/Celery, metrics) and the command line."""


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    found: dict[str, Path] = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if package != "enginehouse" or parts[0] not in ("actors", "messages"):
                found[".".join([package, *parts])] = path
    return found


MODULES = module_files()


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "facade"  # the package root re-exports the facade
    head = parts[1]
    if head in ("actors", "messages"):
        return head
    if head in EDGE_PACKAGES or head == "__main__":
        return "edge"
    if head in FACADE:
        return "facade"
    if head in CORE:
        return "core"
    pytest.fail(f"{module}: classify it in tests/test_layering.py (CORE, FACADE or an edge)")


def imported_modules(path: Path, module: str) -> set[str]:
    """Our modules that ``path`` imports (``from enginehouse import x``: x, if a module)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "enginehouse"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "enginehouse":
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES or f"{candidate}.__init__" in MODULES
                          else base)
    return {m.removesuffix(".__init__") for m in found}


@pytest.mark.parametrize("module", sorted(MODULES), ids=str)
def test_imports_only_its_own_layer_or_lower(module: str) -> None:
    own = ORDER.index(layer_of(module))
    higher = sorted(
        f"{target} ({layer_of(target)})"
        for target in imported_modules(MODULES[module], module)
        if ORDER.index(layer_of(target)) > own
    )
    assert higher == [], f"{module} ({layer_of(module)}) imports a higher layer"


def test_the_scan_resolves_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from enginehouse.actors.registry import EngineRegistry\n"
        "from enginehouse import engines, errors\n"
        "def late():\n    import enginehouse.manager\n"
    )
    found = imported_modules(sample, "enginehouse.messages.sample")
    assert {"enginehouse.actors.registry", "enginehouse", "enginehouse.errors",
            "enginehouse.manager"} <= found


def test_every_layer_has_modules() -> None:
    layers = {layer_of(m) for m in MODULES}
    assert layers == set(ORDER)
