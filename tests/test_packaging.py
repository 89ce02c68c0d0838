"""The distribution: one import package, and it lives beside a user's own ``app``."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
         "--no-deps", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=600,
    )
    (built,) = out.glob("enginehouse-*.whl")
    yield built


def test_the_wheel_holds_only_the_enginehouse_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    heads = {name.split("/", 1)[0] for name in names}
    top = {head for head in heads if not head.endswith(".dist-info")}
    assert top == {"enginehouse"}
    for module in ("py.typed", "__init__.py", "__main__.py", "errors.py", "actors/registry.py",
                   "messages/registry.py", "integrations/flask.py", "cli/main.py"):
        assert f"enginehouse/{module}" in names, module


def test_the_wheel_declares_the_console_script_and_license(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    info = next(n.split("/")[0] for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    assert "enginehouse = enginehouse.cli:main" in archive.read(f"{info}/entry_points.txt").decode()
    metadata = archive.read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "Requires-Python: >=3.10" in metadata


def test_a_project_with_its_own_app_package_imports_both(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         "--target", str(site), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    project = tmp_path / "myproject"
    (project / "app").mkdir(parents=True)
    (project / "app" / "__init__.py").write_text("OWNER = 'myproject'\n")
    script = (
        "import app, enginehouse\n"
        "from enginehouse import engines, EngineManager, DatabaseSpec, SSHTunnelSpec, Mode\n"
        "from enginehouse.errors import EngineManagerError\n"
        "assert app.OWNER == 'myproject', app.__file__\n"
        "assert enginehouse.__file__.startswith({!r}), enginehouse.__file__\n"
        "with EngineManager(mode=Mode.SINGLETON, forbid_unsafe_uris=False) as m:\n"
        "    db = DatabaseSpec(id=1, uri='sqlite:///' + {!r})\n"
        "    with m.connect(db) as conn:\n"
        "        print(conn.exec_driver_sql('select 41 + 1').scalar())\n"
    ).format(str(site), str(tmp_path / "db.sqlite"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(project), str(site)])}
    result = subprocess.run([sys.executable, "-c", script], cwd=project, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42"


def test_version_everywhere() -> None:
    import enginehouse

    result = subprocess.run([sys.executable, "-m", "enginehouse", "--version"],
                            capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == f"enginehouse {enginehouse.__version__}"
    assert enginehouse.__version__[0].isdigit()
