"""Restart policies, as in Erlang/OTP: intensity and period as data, one-for-one.

pykka has no supervision of its own. A :class:`RestartPolicy` says how often a
child may be restarted and how long to wait before each restart; a
:class:`RestartLedger` remembers one child's recent restarts and answers
whether another is allowed.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field

from enginehouse.compat import StrEnum


class RestartType(StrEnum):
    """When a child that stopped is started again."""

    PERMANENT = "permanent"  # always
    TRANSIENT = "transient"  # only after a crash, not after a normal stop
    TEMPORARY = "temporary"  # never


@dataclass(frozen=True)
class RestartPolicy:
    """At most ``max_restarts`` within ``period`` seconds, each after an exponential backoff.

    The n-th restart in a period waits ``backoff * 2**(n-1)`` seconds, capped at
    ``backoff_max``, give or take ``jitter`` (a fraction) so that many children
    failing together do not restart in lockstep.
    """

    max_restarts: int = 5
    period: float = 60.0
    backoff: float = 0.05
    backoff_max: float = 2.0
    jitter: float = 0.2
    restart: RestartType = RestartType.PERMANENT

    def delay(self, attempt: int) -> float:
        """Seconds to wait before restart number ``attempt`` (1-based)."""
        base = min(self.backoff * (2 ** max(attempt - 1, 0)), self.backoff_max)
        spread = base * self.jitter
        return max(0.0, base + random.uniform(-spread, spread))

    def should_restart(self, crashed: bool) -> bool:
        """Whether the restart type asks for a restart of a child that stopped."""
        if self.restart is RestartType.TEMPORARY:
            return False
        return crashed or self.restart is RestartType.PERMANENT


@dataclass
class RestartLedger:
    """One child's restart history under a policy. Owned by a single actor."""

    policy: RestartPolicy
    restarts: int = 0
    recent: deque[float] = field(default_factory=deque)

    def next_delay(self, now: float | None = None) -> float | None:
        """Record a restart and return its backoff, or ``None`` when intensity is exceeded."""
        now = time.monotonic() if now is None else now
        while self.recent and now - self.recent[0] > self.policy.period:
            self.recent.popleft()
        if len(self.recent) >= self.policy.max_restarts:
            return None
        self.recent.append(now)
        self.restarts += 1
        return self.policy.delay(len(self.recent))
