"""Fork safety: a child process never uses its parent's actors or sockets.

After ``os.fork()`` the parent's actor threads do not exist in the child,
although pykka still reports them alive. This module bumps a generation
number in every child; a manager that sees a new generation rebuilds its
actor system, and each engine it had cached drops its pool without closing
the parent's sockets (``dispose(close=False)``), as SQLAlchemy recommends.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

from enginehouse import compat


class ForkAware(Protocol):
    def after_fork_in_child(self) -> None: ...


class _State:
    __slots__ = ("generation",)

    def __init__(self) -> None:
        self.generation = 0


state = _State()
"""``state.generation`` changes in each forked child; compare it to notice a fork."""

_tracked: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def track(obj: ForkAware) -> None:
    """Call ``obj.after_fork_in_child()`` in every child forked from now on."""
    _tracked.add(obj)


def untrack(obj: ForkAware) -> None:
    _tracked.discard(obj)


def _after_fork_in_child() -> None:
    state.generation += 1
    # The parent's actors are dead here; forget them so nothing waits on them,
    # and replace a registry lock a parent thread may have held at fork time.
    compat.forget_all_actors()
    for obj in list(_tracked):
        obj.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
