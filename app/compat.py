"""The one place that knows which Python, SQLAlchemy and pykka it runs on.

enginehouse supports Python 3.10-3.13, SQLAlchemy 1.4 and 2.0/2.1, pykka 4.
Every version switch, and every use of a private SQLAlchemy or pykka internal,
sits here behind a small named function, so an upgrade that changes them
breaks one module (and tests/test_compat.py), not the budget code.
"""

from __future__ import annotations

import enum
import sys
from typing import Any

import sqlalchemy
from sqlalchemy import pool as sa_pool
from sqlalchemy.engine import URL

PY311 = sys.version_info >= (3, 11)
SQLALCHEMY_2 = int(sqlalchemy.__version__.split(".", 1)[0]) >= 2

# -- Python ---------------------------------------------------------------------

if PY311:
    from enum import StrEnum
else:

    class StrEnum(str, enum.Enum):  # type: ignore[no-redef]
        """Python 3.11's ``enum.StrEnum``: members are strings and print as their value."""

        __str__ = str.__str__  # type: ignore[assignment]
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
