"""The ``enginehouse`` command line: ``demo``, ``check``, ``stats``, ``bench``."""

from enginehouse.cli.main import main

__all__ = ["main"]
