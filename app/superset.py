"""The pinned entry point for Apache Superset: in ``superset_config.py``::

    from enginehouse.superset import install
    FLASK_APP_MUTATOR = install

See :mod:`enginehouse.integrations.superset` and docs/superset.md.
"""

from enginehouse.integrations.superset import install

__all__ = ["install"]
