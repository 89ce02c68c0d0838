#!/usr/bin/env bash
# Create or update .venv/superset: stock Apache Superset 6.1.0 plus this repository (editable),
# for the end-to-end tests (tests/superset_e2e/) and benchmarks/bench_superset.py.
#   Python 3.10; apache-superset==6.1.0 and psycopg2-binary; the four pins Superset's lock file
#   has but its metadata lacks (rich, flask-caching 2.3.1, cachetools 6.2.1, paramiko<4);
#   celery and kombu below 5.6 (as Superset's lock file has them: kombu 5.6+ wants redis-py >= 6.1,
#   Superset pins redis<6, so async SQL Lab's worker dies at start);
#   gevent (Superset's documented gunicorn worker class), PyMySQL; then
#   -e ".[superset,postgres,mysql,fleet]" constrained to what Superset already installed.
# Cached by a stamp: a rerun costs nothing unless pyproject.toml or this script changed
# (the editable install picks up code changes by itself).
# Usage: scripts/superset-env.sh            prints the venv's python on stdout when ready
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv/superset
SUPERSET_PINS=(
  "apache-superset==6.1.0" "psycopg2-binary" "rich" "flask-caching==2.3.1"
  "cachetools==6.2.1" "paramiko<4" "celery<5.6" "kombu<5.6" "gevent" "PyMySQL"
)

find_python() {  # python3.10 from PATH, else from pyenv's versions (as scripts/test.sh does)
  local want=3.10 candidate
  for candidate in "python$want" "$HOME"/.pyenv/versions/"$want".*/bin/python"$want" \
                   /root/.pyenv/versions/"$want".*/bin/python"$want"; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import venv' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  echo "scripts/superset-env.sh: Python $want not found (install it with pyenv)" >&2; return 1
}

stamp=$(cat pyproject.toml "$0" | sha256sum | cut -c1-16)
mkdir -p .venv
exec 9>.venv/superset.lock
flock 9  # one build at a time (a test run and a benchmark may both ask)
if [[ -f "$VENV/.stamp" && "$(cat "$VENV/.stamp")" == "$stamp" ]]; then
  echo "$PWD/$VENV/bin/python"; exit 0
fi

echo "== preparing $VENV (Python 3.10, apache-superset 6.1.0)" >&2
rm -rf "$VENV"
"$(find_python)" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade "pip>=25.1"
"${pip[@]}" "${SUPERSET_PINS[@]}"
# Ours must not move what Superset pinned: constrain it to the versions now installed.
frozen=$(mktemp)
trap 'rm -f "$frozen"' EXIT
"$VENV/bin/python" -m pip freeze --exclude-editable | grep -v '^-e ' > "$frozen"
"${pip[@]}" -c "$frozen" -e ".[superset,postgres,mysql,fleet]"

"$VENV/bin/python" -m pip check >&2
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import psycopg2, redis, sqlalchemy  # noqa: F401  (each must import)
assert md.version("apache-superset") == "6.1.0", md.version("apache-superset")
assert sqlalchemy.__version__.startswith("1.4."), sqlalchemy.__version__
assert int(redis.__version__.split(".")[0]) < 6, redis.__version__
assert int(md.version("paramiko").split(".")[0]) < 4, md.version("paramiko")
assert tuple(map(int, md.version("kombu").split(".")[:2])) < (5, 6), md.version("kombu")
import enginehouse  # noqa: F401
EOF
echo "$stamp" > "$VENV/.stamp"
echo "$PWD/$VENV/bin/python"
