"""A throwaway sshd that logs each login, so logins per bastion can be counted from outside."""

from __future__ import annotations

import tempfile
from pathlib import Path

from sshd_fixtures import ThrowawaySshd, _ensure_user, install_sshd, remove_sshd

from .harness import ssh_logins


class LoggingSshd(ThrowawaySshd):
    """tests/sshd_fixtures.py's sshd at LogLevel INFO: "Accepted publickey for ..." per login."""

    def _config(self) -> Path:
        config = super()._config()
        config.write_text(config.read_text().replace("LogLevel ERROR", "LogLevel INFO"))
        return config

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"

    def logins(self) -> int:
        return ssh_logins(self.log)


def start_bastion() -> LoggingSshd:
    install_sshd()
    _ensure_user()
    server = LoggingSshd(Path(tempfile.mkdtemp(prefix="enginehouse-bastion-")))
    server.start()
    return server


def stop_bastion(server: LoggingSshd) -> None:
    remove_sshd(server)
