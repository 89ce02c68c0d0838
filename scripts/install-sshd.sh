#!/usr/bin/env bash
# Install OpenSSH's server when /usr/sbin/sshd is missing (tests and benchmarks start their own).
set -euo pipefail
if [ ! -x /usr/sbin/sshd ]; then
  # Concurrent test runs: one installs, the others wait for it.
  exec 9>/tmp/enginehouse-install-sshd.lock
  flock 9
fi
if [ ! -x /usr/sbin/sshd ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends openssh-server openssh-client >/dev/null
fi
mkdir -p /run/sshd
command -v ssh-keygen >/dev/null
