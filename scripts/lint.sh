#!/usr/bin/env bash
# ruff and mypy over everything we write: the package, the tests, the benchmarks and scripts.
# Uses the sqla2 stack's venv (scripts/test.sh creates it) with the "lint" dependency group.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/sqla2/bin/python ]] || scripts/test.sh --stack sqla2 --collect-only -q >/dev/null
py=.venv/sqla2/bin/python
$py -m pip install -q --disable-pip-version-check --group lint
$py -m ruff check .
# mypy cannot follow setuptools' package-dir mapping: give it the installed shape as symlinks.
shape=$(mktemp -d); trap 'rm -rf "$shape"' EXIT
mkdir "$shape/enginehouse"
for entry in app/*; do ln -s "$PWD/$entry" "$shape/enginehouse/$(basename "$entry")"; done
ln -s "$PWD/actors" "$shape/enginehouse/actors"; ln -s "$PWD/messages" "$shape/enginehouse/messages"
MYPYPATH="$shape" $py -m mypy -p enginehouse
$py -m mypy benchmarks scripts
(cd tests && ../$py -m mypy --explicit-package-bases .)
