#!/bin/sh
# Install PgBouncer when it is missing (tests/pgbouncer_fixtures.py and benchmarks/bench_fleet.py
# call this). PgBouncer refuses to run as root: the fixtures run it as the postgres user with an
# ini of their own in a temporary directory.
set -eu
if command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq pgbouncer >/dev/null
# The package starts its own service on 6432 on some systems: ours never uses it.
$SUDO service pgbouncer stop >/dev/null 2>&1 || true
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]
