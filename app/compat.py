"""The one place that knows which Python, SQLAlchemy and pykka it runs on.

enginehouse supports Python 3.10-3.13, SQLAlchemy 1.4 and 2.0/2.1, pykka 4.
Every version switch, and every use of a private SQLAlchemy or pykka internal,
sits here behind a small named function, so an upgrade that changes them
breaks this module (and tests/test_compat.py, run on both stacks), not the
budget or fork code. pyproject.toml bounds what we rely on: SQLAlchemy<2.2,
pykka<5.

What is private and used:

* QueuePool's counters and idle queue (``_pool``, ``_overflow``,
  ``_max_overflow``, ``_inc_overflow``/``_dec_overflow``) and an empty
  ``_ConnectionRecord``: :class:`enginehouse.budgeted_pool.BudgetedQueuePool`
  resizes itself at run time through them.
* ``Pool._invoke_creator`` and ``Pool._creator``: a permit is taken before each
  physical connect.
* ``Engine._has_events``: a listener of ours must not route every statement
  through SQLAlchemy's event system.
* pykka's ``ActorRegistry._actor_refs`` and its lock: a forked child forgets
  its parent's actors.

The template methods BudgetedQueuePool overrides (``_do_get``,
``_do_return_conn``, ``_close_connection``) are SQLAlchemy's documented way to
write a pool; :data:`POOL_TEMPLATE_METHODS` names them so the tests check they
still exist.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable
from typing import Any, cast

import pykka
import sqlalchemy
from sqlalchemy import event
from sqlalchemy import pool as sa_pool
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool.base import _ConnectionRecord
from sqlalchemy.util import queue as sqla_queue

PY311 = sys.version_info >= (3, 11)
SQLALCHEMY_2 = int(sqlalchemy.__version__.split(".", 1)[0]) >= 2

# -- Python ---------------------------------------------------------------------

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:

    class StrEnum(str, enum.Enum):
        """Python 3.11's ``enum.StrEnum``: members are strings and print as their value."""

        __str__ = str.__str__
        __format__ = str.__format__  # type: ignore[assignment]

        @staticmethod
        def _generate_next_value_(name: str, start: int, count: int, last: list[str]) -> str:
            return name.lower()


# -- SQLAlchemy dialects --------------------------------------------------------


def postgres_driver() -> str:
    """The PostgreSQL DBAPI this SQLAlchemy speaks best: psycopg 3 on 2.x, psycopg2 on 1.4.

    SQLAlchemy 1.4 has no ``postgresql+psycopg`` dialect; a URI we build ourselves
    (tests, benchmarks, examples) names this driver so it loads on either.
    """
    return "psycopg" if SQLALCHEMY_2 else "psycopg2"


def postgres_uri(rest: str) -> str:
    """``postgresql+<driver>://`` + ``rest``, with this stack's driver."""
    return f"postgresql+{postgres_driver()}://{rest}"


def pool_defaults_of_sqlalchemy_2(url: URL, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Engine arguments that give SQLAlchemy 1.4 the pool 2.x picks by itself.

    SQLAlchemy 2.0 pools connections to a SQLite *file* (QueuePool, with
    ``check_same_thread=False``); 1.4 used NullPool, which refuses the pool
    arguments (``pool_size``...) a database's extra may give. Same behaviour on
    both stacks: on 1.4 a pysqlite file database without a pool class of its own
    gets 2.x's defaults. Anything else is returned unchanged.
    """
    if SQLALCHEMY_2 or "poolclass" in kwargs or "pool" in kwargs:
        return kwargs
    if url.get_backend_name() != "sqlite" or url.get_driver_name() != "pysqlite":
        return kwargs
    if not url.database or url.database == ":memory:" or url.query.get("mode") == "memory":
        return kwargs
    connect_args = dict(kwargs.get("connect_args") or {})
    if "check_same_thread" not in url.query:
        connect_args.setdefault("check_same_thread", False)
    return {**kwargs, "poolclass": sa_pool.QueuePool, "connect_args": connect_args}


# -- SQLAlchemy events ----------------------------------------------------------


def listen_off_the_statement_path(engine: Engine, name: str, listener: Callable[..., Any]) -> None:
    """``event.listen(engine, name, listener)`` that leaves statements event-free.

    Any engine listener sets ``Engine._has_events``, which routes every
    statement through SQLAlchemy's event system (+15-20% per pooled
    ``SELECT 1``). For events the engine dispatches itself (``engine_disposed``)
    that flag is not needed: put it back. A later listener of anyone sets it again.
    """
    had_events = engine._has_events
    event.listen(engine, name, listener)
    engine._has_events = had_events


# -- SQLAlchemy pools: the creator ----------------------------------------------

Creator = Callable[[Any], Any]
"""``creator(connection_record) -> DBAPI connection``: how a pool connects."""


def wrap_connect(pool: sa_pool.Pool, wrap: Callable[[Creator], Creator]) -> None:
    """Route this pool's physical connects through ``wrap(connect)``.

    Only this pool: ``recreate()`` (``engine.dispose()``) builds the next pool
    from the creator it was given, unwrapped (a pool class wraps its own).
    """
    cast(Any, pool)._invoke_creator = wrap(pool._invoke_creator)


def wrap_creator(pool: sa_pool.Pool, wrap: Callable[[Creator], Creator]) -> None:
    """Route physical connects through ``wrap(connect)``, in this pool and its recreations.

    For pool classes we do not subclass: ``recreate()`` passes the wrapped
    creator on, so the pool that replaces a disposed one connects through it too.
    """
    cast(Any, pool)._creator = wrap(pool._invoke_creator)


# -- SQLAlchemy pools: QueuePool's counters -------------------------------------

POOL_TEMPLATE_METHODS = ("_do_get", "_do_return_conn", "_close_connection")
"""The Pool methods SQLAlchemy's own pools override, and so does BudgetedQueuePool."""

UNBOUNDED = -1
"""A connection limit that is none (QueuePool's ``max_overflow=-1``)."""


def count_connections(pool: sa_pool.QueuePool, limit: int) -> None:
    """Make a fresh QueuePool count *all* its connections against one ``limit``.

    QueuePool bounds ``pool_size`` (its queue) and ``max_overflow`` separately
    and can resize neither. A budget resizes pools at run time, which the
    overflow counter supports: so the queue becomes unbounded and the overflow
    counter counts every connection (``size()`` then says 0 and ``overflow()``
    the connections). No connection may exist yet.
    """
    pool._pool.maxsize = 0
    pool._overflow = 0
    pool._max_overflow = limit


def connection_limit(pool: sa_pool.QueuePool) -> int:
    """How many connections a counting pool may hold (:data:`UNBOUNDED`: no limit)."""
    limit: int = pool._max_overflow
    return limit


def set_connection_limit(pool: sa_pool.QueuePool, limit: int) -> None:
    """Change a counting pool's limit (threads already waiting in its queue are not woken)."""
    pool._max_overflow = limit


def connection_count(pool: sa_pool.QueuePool) -> int:
    """How many connections (records, idle or checked out) a counting pool holds."""
    count: int = pool._overflow
    return count


def reserve_connection(pool: sa_pool.QueuePool) -> bool:
    """Count one more connection if the limit allows (atomic, SQLAlchemy's own lock)."""
    return bool(pool._inc_overflow())


def forget_connection(pool: sa_pool.QueuePool) -> None:
    """Count one connection less (its record left the pool)."""
    pool._dec_overflow()


def take_idle(pool: sa_pool.QueuePool) -> Any | None:
    """An idle record from the pool's queue without waiting, or None."""
    try:
        return pool._pool.get(False)
    except sqla_queue.Empty:
        return None


def put_idle(pool: sa_pool.QueuePool, record: Any) -> None:
    """Put a record (back) in the pool's queue; the first waiting thread gets it."""
    pool._pool.put(record, False)


def idle_count(pool: sa_pool.QueuePool) -> int:
    """How many records wait in the pool's queue."""
    return int(pool._pool.qsize())


def empty_record(pool: sa_pool.Pool) -> Any:
    """A record with no connection yet: whoever checks it out connects."""
    return _ConnectionRecord(pool, connect=False)


# -- pykka ----------------------------------------------------------------------


def forget_all_actors() -> None:
    """Empty pykka's actor registry and give it a fresh lock (in a forked child).

    The parent's actor threads do not exist in the child, although the registry
    still lists them; a parent thread may have held the registry's lock at fork
    time. pykka has no public call that does this.
    """
    registry = pykka.ActorRegistry
    registry._actor_refs = []
    registry._actor_refs_lock = type(registry._actor_refs_lock)()


__all__ = [
    "POOL_TEMPLATE_METHODS",
    "PY311",
    "SQLALCHEMY_2",
    "UNBOUNDED",
    "StrEnum",
    "connection_count",
    "connection_limit",
    "count_connections",
    "empty_record",
    "forget_all_actors",
    "forget_connection",
    "idle_count",
    "listen_off_the_statement_path",
    "pool_defaults_of_sqlalchemy_2",
    "postgres_driver",
    "postgres_uri",
    "put_idle",
    "reserve_connection",
    "set_connection_limit",
    "take_idle",
    "wrap_connect",
    "wrap_creator",
]
