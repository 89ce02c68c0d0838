"""gevent workers: make psycopg2 cooperative, so tunneled queries do not hang.

Under ``gunicorn -k gevent`` every thread is a greenlet, our tunnel relays
included. psycopg2 is C code that blocks the whole process while it waits
for the server: when that server is our own forward, the relay greenlet that
would answer never runs, and the query hangs (stock Superset 6.1 hangs the
same way with sshtunnel). psycogreen's wait callback makes psycopg2 yield to
the gevent hub while it waits, so the relay runs. Pure-Python drivers
(PyMySQL) are cooperative once gevent patched the socket module.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("enginehouse.superset")


def gevent_patched() -> bool:
    """Whether gevent monkey-patched this process's sockets (gunicorn's gevent worker)."""
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey

    return bool(monkey.is_module_patched("socket"))


def make_psycopg2_cooperative() -> bool:
    """Install psycogreen's gevent wait callback when gevent is active; True if installed."""
    if not gevent_patched():
        return False
    try:
        import psycopg2.extensions
        from psycogreen.gevent import gevent_wait_callback
    except ImportError as exc:
        log.warning(
            "gevent is active but %s is missing: psycopg2 queries through SSH tunnels may "
            "hang (pip install 'enginehouse[superset]')",
            exc.name,
        )
        return False
    if psycopg2.extensions.get_wait_callback() is not gevent_wait_callback:
        psycopg2.extensions.set_wait_callback(gevent_wait_callback)
        log.info("gevent detected: psycopg2 made cooperative (psycogreen)")
    return True


_checked_in = [0]  # the pid that last checked (a fork, or --preload's worker, checks again)


def ensure_cooperative() -> None:
    """:func:`make_psycopg2_cooperative` once per process, on the first tunnel.

    ``install`` already ran it, but under ``gunicorn --preload`` the app (and so
    ``install``) loads in the master before the gevent worker patches: this catches it.
    """
    pid = os.getpid()
    if _checked_in[0] == pid:
        return
    make_psycopg2_cooperative()
    _checked_in[0] = pid
