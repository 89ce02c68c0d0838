"""``python -m enginehouse``: the ``enginehouse`` command line."""

from enginehouse.cli.main import main

raise SystemExit(main())
