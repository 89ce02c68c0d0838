"""Stock Apache Superset on enginehouse, without editing Superset's code.

In ``superset_config.py``::

    from enginehouse.superset import install
    FLASK_APP_MUTATOR = install

:func:`install` builds the manager from the app's config (:mod:`.config`),
points Superset's ``create_engine`` call at it (:mod:`.engine_hook`), sets
Superset's SSH manager to the shared tunnels (:mod:`.ssh`) and, under gevent,
makes psycopg2 cooperative (:mod:`.cooperative`). See docs/superset.md.
"""

from enginehouse.integrations.superset.install import install, installed_state

__all__ = ["install", "installed_state"]
