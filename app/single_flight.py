"""Run a function once per key across threads, without a lock of our own.

``dict.setdefault`` is atomic: the thread whose future lands in the dict runs
the function; the others wait on that future (with a timeout).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import pykka

from enginehouse.errors import ActorTimeoutError

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """``once.run(key, fn, timeout)``: ``fn()`` runs for the first caller of each key."""

    def __init__(self) -> None:
        self._claims: dict[Hashable, pykka.ThreadingFuture[Any]] = {}

    def run(self, key: Hashable, fn: Callable[[], T], timeout: float) -> T:
        mine: pykka.ThreadingFuture[Any] = pykka.ThreadingFuture()
        winner = self._claims.setdefault(key, mine)
        if winner is mine:
            try:
                mine.set(fn())
            except BaseException:
                mine.set_exception()
                del self._claims[key]  # let a later caller try again
                raise
        try:
            result: T = winner.get(timeout=timeout)
            return result
        except pykka.Timeout:
            raise ActorTimeoutError(f"waited {timeout:g}s for another thread's start-up") from None
