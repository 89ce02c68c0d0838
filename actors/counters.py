"""Reading an ``itertools.count``: the lock-free counter our threads share.

``next(counter)`` is atomic in CPython, so concurrent increments are never
lost; the counter has no read accessor, but its repr is ``count(N)``.
"""

from __future__ import annotations

import itertools


def count_value(counter: itertools.count[int]) -> int:
    """The value ``next(counter)`` would return, without advancing it."""
    return int(repr(counter)[6:-1])
