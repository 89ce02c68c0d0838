"""Regenerate the settings table of docs/configuration.md from ManagerSettings.

    python scripts/gen_config_doc.py          # rewrite the table in place
    python scripts/gen_config_doc.py --check  # exit 1 when the doc is stale (used by the tests)
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from enginehouse.settings import ManagerSettings  # noqa: E402

DOC = ROOT / "docs" / "configuration.md"
BEGIN, END = "<!-- settings-table:begin -->", "<!-- settings-table:end -->"


def table() -> str:
    rows = ["| setting | default | environment variable | meaning |", "| --- | --- | --- | --- |"]
    for name, field in ManagerSettings.model_fields.items():
        default = field.default
        if default is PydanticUndefined or default is None:
            shown = "—" if default is None else "required"
        else:
            shown = f"`{getattr(default, 'value', default)!s}`"
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {shown} | `ENGINEHOUSE_{name.upper()}` | {meaning} |")
    return "\n".join(rows)


def render(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main() -> int:
    current = DOC.read_text()
    fresh = render(current)
    if "--check" in sys.argv:
        return 0 if fresh == current else 1
    DOC.write_text(fresh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
