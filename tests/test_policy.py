"""Restart policy as data: intensity within a period, backoff growth and cap, restart types."""

from __future__ import annotations

import pytest

from enginehouse.actors.policy import RestartLedger, RestartPolicy, RestartType


def test_ledger_allows_max_restarts_within_period_then_gives_up() -> None:
    ledger = RestartLedger(RestartPolicy(max_restarts=3, period=10.0, jitter=0.0))
    delays = [ledger.next_delay(now=100.0 + i) for i in range(3)]
    assert all(d is not None for d in delays)
    assert ledger.next_delay(now=103.0) is None
    assert ledger.restarts == 3


def test_ledger_forgets_restarts_older_than_period() -> None:
    ledger = RestartLedger(RestartPolicy(max_restarts=2, period=10.0, jitter=0.0))
    assert ledger.next_delay(now=0.0) is not None
    assert ledger.next_delay(now=1.0) is not None
    assert ledger.next_delay(now=5.0) is None
    # 10.5 s later the first restart left the window: one more is allowed.
    assert ledger.next_delay(now=10.5) is not None
    assert ledger.restarts == 3


def test_zero_intensity_never_restarts() -> None:
    ledger = RestartLedger(RestartPolicy(max_restarts=0))
    assert ledger.next_delay(now=0.0) is None
    assert ledger.restarts == 0


def test_backoff_doubles_and_is_capped() -> None:
    policy = RestartPolicy(backoff=0.1, backoff_max=0.5, jitter=0.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


def test_ledger_delays_grow_with_recent_restarts() -> None:
    ledger = RestartLedger(RestartPolicy(max_restarts=4, backoff=1.0, backoff_max=3.0, jitter=0.0))
    assert [ledger.next_delay(now=float(i)) for i in range(4)] == [1.0, 2.0, 3.0, 3.0]


def test_jitter_stays_within_its_fraction() -> None:
    policy = RestartPolicy(backoff=1.0, backoff_max=10.0, jitter=0.2)
    samples = [policy.delay(2) for _ in range(200)]
    assert all(1.6 <= s <= 2.4 for s in samples)
    assert len(set(samples)) > 1  # it does spread


@pytest.mark.parametrize(
    ("restart", "crashed", "expected"),
    [
        (RestartType.PERMANENT, True, True),
        (RestartType.PERMANENT, False, True),
        (RestartType.TRANSIENT, True, True),
        (RestartType.TRANSIENT, False, False),
        (RestartType.TEMPORARY, True, False),
        (RestartType.TEMPORARY, False, False),
    ],
)
def test_restart_types(restart: RestartType, crashed: bool, expected: bool) -> None:
    assert RestartPolicy(restart=restart).should_restart(crashed=crashed) is expected
