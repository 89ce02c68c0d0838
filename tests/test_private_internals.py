"""Only enginehouse.compat touches SQLAlchemy's or pykka's private internals (checked on the AST).

The private names come from the installed libraries themselves (the classes we
meet and live instances of them), so the scan follows the stack it runs on.
Overriding a template method (``def _do_get`` in a Pool subclass, then
``super()._do_get()``) is how SQLAlchemy's own pools are written: allowed.
"""

from __future__ import annotations

import ast
import sqlite3
from pathlib import Path
from typing import Any

import pykka
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import NullPool, Pool, QueuePool

from enginehouse import compat

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "actors", "messages")
COMPAT = ROOT / "app" / "compat.py"
LIBRARIES = ("sqlalchemy", "pykka")
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}  # public, despite the underscore
REFLECTION = {"getattr", "setattr", "hasattr", "delattr"}


def _private(names: object) -> set[str]:
    return {n for n in dir(names) if n.startswith("_") and not n.endswith("__")}


def library_internals() -> set[str]:
    """Private attribute names of the SQLAlchemy and pykka objects our code meets."""
    creator: Any = lambda: sqlite3.connect(":memory:")  # noqa: E731 (a DBAPI creator, typed Any)
    pool = QueuePool(creator, pool_size=1)
    record = compat.empty_record(pool)
    engine = create_engine("sqlite://")
    actor = pykka.ThreadingActor()
    found: set[str] = set()
    for thing in (Pool, QueuePool, NullPool, pool, record, Engine, engine, Connection, URL,
                  make_url("sqlite://"), pykka.ActorRegistry, pykka.ActorRef, pykka.Future,
                  pykka.ThreadingActor, actor):
        found |= _private(thing)
    engine.dispose()
    return found - NAMEDTUPLE_API


INTERNALS = library_internals()


def own_names(tree: ast.AST) -> set[str]:
    """Private names the module defines itself: functions, methods, attributes it assigns."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)
    return names


def _is_self_or_super(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "super")


def internal_uses(source: str) -> list[str]:
    """``line: what`` for each private SQLAlchemy/pykka name the source uses."""
    tree = ast.parse(source)
    own = own_names(tree)
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARIES:
            module = node.module or ""
            private = [a.name for a in node.names if a.name.startswith("_")]
            if private or any(part.startswith("_") for part in module.split(".")):
                found.append(f"{node.lineno}: from {module} import {', '.join(private) or '...'}")
        elif isinstance(node, ast.Attribute) and node.attr in INTERNALS:
            if not (_is_self_or_super(node.value) and node.attr in own):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in REFLECTION and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in INTERNALS):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def sources() -> list[Path]:
    files = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) >= 10, "the scan found too few files to mean anything"
    return [path for path in files if path != COMPAT]


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_compat_uses_library_internals(path: Path) -> None:
    assert internal_uses(path.read_text()) == []


def test_the_internals_we_rely_on_are_known_to_the_scan() -> None:
    for name in ("_pool", "_overflow", "_max_overflow", "_inc_overflow", "_dec_overflow",
                 "_invoke_creator", "_creator", "_do_get", "_has_events", "_actor_refs",
                 "_actor_refs_lock", "_ConnectionRecord__pool"):
        assert name in INTERNALS, name


@pytest.mark.parametrize(
    "snippet",
    [
        "pool._overflow += 1",
        "limit = engine.pool._max_overflow",
        "owner = getattr(record, '_ConnectionRecord__pool', None)",
        "from sqlalchemy.pool.base import _ConnectionRecord",
        "from sqlalchemy.util import _collections",
        "import pykka\npykka.ActorRegistry._actor_refs = []",
        "engine._has_events = False",
        "class P:\n    def get(self):\n        return self._do_get()",  # inherited, not ours
    ],
)
def test_the_scan_finds_internals(snippet: str) -> None:
    assert internal_uses(snippet) != []


@pytest.mark.parametrize(
    "snippet",
    [
        "class P(QueuePool):\n    def _do_get(self):\n        return super()._do_get()",
        "class A:\n    def __init__(self):\n        self._timeout = 1\n"
        "    def t(self):\n        return self._timeout",
        "compat.take_idle(pool)",
        "url = url._replace(password=None)",
        "import sys\nframe = sys._getframe(1)",
    ],
)
def test_the_scan_leaves_our_own_names_alone(snippet: str) -> None:
    assert internal_uses(snippet) == []
