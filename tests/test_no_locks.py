"""No lock of our own: actors and messages replace them (issue 3's rule), checked on the AST."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "actors", "messages")
LOCKS = {"Lock", "RLock", "Condition", "Semaphore", "BoundedSemaphore"}
LOW_LEVEL = {"allocate_lock", "allocate", "RLock"}  # the _thread module's spellings


def lock_uses(source: str) -> list[str]:
    """``line: what`` for every threading lock primitive the source names."""
    tree = ast.parse(source)
    threading_names = {"threading"}
    thread_names = {"_thread"}
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "threading":
                    threading_names.add(alias.asname or alias.name)
                if alias.name == "_thread":
                    thread_names.add(alias.asname or alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module in ("threading", "_thread"):
            banned = LOCKS if node.module == "threading" else LOW_LEVEL
            found += [f"{node.lineno}: from {node.module} import {a.name}"
                      for a in node.names if a.name in banned or a.name == "*"]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in threading_names and node.attr in LOCKS:
                found.append(f"{node.lineno}: threading.{node.attr}")
            if node.value.id in thread_names and node.attr in LOW_LEVEL:
                found.append(f"{node.lineno}: _thread.{node.attr}")
    return found


def sources() -> list[Path]:
    files = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) >= 10, "the scan found too few files to mean anything"
    return files


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_lock_in_our_code(path: Path) -> None:
    assert lock_uses(path.read_text()) == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import threading\nx = threading.Lock()",
        "import threading as t\nx = t.RLock()",
        "from threading import Condition",
        "from threading import *",
        "import threading\nclass A:\n    lock_type = threading.Semaphore",
        "import threading\nx = threading.BoundedSemaphore(2)",
        "import _thread\nx = _thread.allocate_lock()",
    ],
)
def test_the_scan_finds_locks(snippet: str) -> None:
    assert lock_uses(snippet)


def test_the_scan_allows_what_the_rule_allows() -> None:
    allowed = "import threading, itertools\nt = threading.Timer(1, print)\nc = itertools.count()"
    assert lock_uses(allowed) == []
