#!/usr/bin/env bash
# Run the whole suite on both supported stacks, each in a virtual environment of its own
# (.venv/<stack>, created and kept up to date here; never the system interpreter):
#   sqla14  Python 3.10, SQLAlchemy 1.4, psycopg2, redis<6 (what Superset 6.x runs on)
#   sqla2   Python 3.13, SQLAlchemy 2.x, psycopg 3
# Usage: scripts/test.sh [--stack sqla14|sqla2] [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A PYTHON=([sqla14]=3.10 [sqla2]=3.13)
stacks=(sqla14 sqla2)
if [[ "${1:-}" == "--stack" ]]; then stacks=("$2"); shift 2; fi
EXTRAS="postgres,mysql,metrics,flask,fastapi,celery,fleet"

find_python() {  # python3.X from PATH, else from pyenv's versions
  local want=$1 candidate
  for candidate in "python$want" "$HOME"/.pyenv/versions/"$want".*/bin/python"$want" \
                   /root/.pyenv/versions/"$want".*/bin/python"$want"; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import venv' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  echo "scripts/test.sh: Python $want not found (install it with pyenv)" >&2; return 1
}

prepare() {  # the stack's venv, reinstalled when pyproject or its constraints change
  local stack=$1 venv=.venv/$1 stamp
  stamp=$(cat pyproject.toml "scripts/stacks/$stack.txt" | sha256sum | cut -c1-16)
  if [[ -f "$venv/.stamp" && "$(cat "$venv/.stamp")" == "$stamp" ]]; then return 0; fi
  echo "== preparing $venv (Python ${PYTHON[$stack]})" >&2
  rm -rf "$venv"
  "$(find_python "${PYTHON[$stack]}")" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade "pip>=25.1"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    -c "scripts/stacks/$stack.txt" -e ".[$EXTRAS]" --group test
  echo "$stamp" > "$venv/.stamp"
}

status=0
for stack in "${stacks[@]}"; do
  prepare "$stack"
  echo "== stack $stack: $(.venv/$stack/bin/python -c 'import sys, sqlalchemy; print("Python", sys.version.split()[0], "SQLAlchemy", sqlalchemy.__version__)')" >&2
  ENGINEHOUSE_STACK=$stack .venv/$stack/bin/python -m pytest "$@" || status=$?
done
exit $status
