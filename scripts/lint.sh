#!/usr/bin/env bash
# ruff and mypy over everything we write: the packages, the tests, the benchmarks and scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check .
python3 -m mypy                                   # app, actors, messages (pyproject.toml)
python3 -m mypy benchmarks scripts
(cd tests && python3 -m mypy --explicit-package-bases .)
