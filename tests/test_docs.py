"""Docs that must stay in step with the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from enginehouse.settings import ManagerSettings

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_reference_lists_every_setting() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    for name in ManagerSettings.model_fields:
        assert f"`{name}`" in text and f"ENGINEHOUSE_{name.upper()}" in text, name


def test_configuration_table_is_regenerated() -> None:
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_config_doc.py"), "--check"], check=False
    )
    assert check.returncode == 0, "run: python scripts/gen_config_doc.py"


def test_every_setting_is_described() -> None:
    missing = [n for n, f in ManagerSettings.model_fields.items() if not f.description]
    assert missing == []


def test_readme_names_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    for marker in ("<!-- demo-command -->", "<!-- test-command -->"):
        block = text.split(marker, 1)[1].split("```", 2)[1].strip()
        assert block, marker
    assert "scripts/test.sh" in text and "python -m enginehouse demo" in text
