"""A bounded cache keyed by a digest of its inputs, for values derived from secrets.

``functools.lru_cache`` keeps its arguments as keys: a plaintext password or
private key would live in the cache key for the life of the process. Here the
key is a sha256 digest; the value (a spec holding ``SecretStr``) is what stays.
Reads and writes are single dict operations: no lock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def digest(*parts: Any) -> str:
    """A short sha256 of ``parts`` (their repr): a cache key that reveals nothing."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


class ContentCache(Generic[T]):
    """``cache.get_or_build(key, build)`` with at most ``size`` entries."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._items: dict[str, T] = {}

    def get_or_build(self, key: str, build: Callable[[], T]) -> T:
        found = self._items.get(key)
        if found is not None:
            return found
        value = build()
        if len(self._items) >= self._size:
            self._items = {}  # rare: a new dict, so concurrent readers never see one shrink
        self._items[key] = value
        return value

    def keys(self) -> list[str]:
        """The digests held (tests check they hold no secret)."""
        return list(self._items)

    def clear(self) -> None:
        self._items = {}
