"""``python -m app``: the ``enginehouse`` command line."""

from app.cli import main

raise SystemExit(main())
