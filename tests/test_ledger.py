"""The process's embedded ledger (app/ledger.py): tokens, shares, cap changes, reaping.

Plain objects, no actor: a Recorder stands in for each member's keeper (the
ledger only asks whether it is alive).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pykka
import pytest
from conftest import Recorder

from enginehouse.ledger import LocalLedger

KEY = "db:ledger-test"


@pytest.fixture
def prefix() -> str:
    return f"eh-ledger-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def keepers() -> Iterator[list[pykka.ActorRef[Any]]]:
    refs = [Recorder.start() for _ in range(3)]
    yield refs
    for ref in refs:
        if ref.is_alive():
            ref.stop()


def members(prefix: str, keepers: list[pykka.ActorRef[Any]]) -> list[LocalLedger]:
    return [LocalLedger(prefix, f"m{i}", ref) for i, ref in enumerate(keepers)]


def take_all(ledger: LocalLedger, cap: int) -> int:
    taken = 0
    while ledger.take(KEY, cap):
        taken += 1
    return taken


def test_the_cap_holds_across_members(prefix: str, keepers: list[pykka.ActorRef[Any]]) -> None:
    one, two, _ = members(prefix, keepers)
    assert take_all(one, 3) == 3
    assert two.take(KEY, 3) is False
    one.give(KEY)
    # One token is free, and the first member to have waited is served first.
    assert one.take(KEY, 3) is False
    assert two.wait(KEY, 1.0) is True
    view = one.view(KEY)
    assert view.shares.held == 3 and view.shares.processes == 2


def test_a_token_given_back_while_another_waits_is_theirs(
    prefix: str, keepers: list[pykka.ActorRef[Any]]
) -> None:
    one, two, three = members(prefix, keepers)
    assert take_all(one, 1) == 1
    assert two.take(KEY, 1, waiting=2) is False
    one.give(KEY)
    assert three.take(KEY, 1) is False  # two waits: three queues behind it
    assert one.view(KEY).callers_waiting == 2 + 1
    assert two.wait(KEY, 1.0) is True


def test_shares_split_the_cap_among_members_that_hold_or_wait(
    prefix: str, keepers: list[pykka.ActorRef[Any]]
) -> None:
    one, two, three = members(prefix, keepers)
    assert take_all(one, 5) == 5
    assert two.take(KEY, 5) is False
    shares = [m.view(KEY).shares.share(5) for m in (one, two)]
    assert sorted(shares) == [2, 3] and three.view(KEY).shares.processes == 2


def test_a_changed_cap_grows_or_shrinks_the_tokens(
    prefix: str, keepers: list[pykka.ActorRef[Any]]
) -> None:
    one, _, _ = members(prefix, keepers)
    assert take_all(one, 2) == 2
    assert take_all(one, 4) == 2  # grown by 2
    one.give(KEY, 4)
    assert take_all(one, 1) == 1  # shrunk to 1 while none was out
    assert take_all(one, 3) == 2  # grown again: 3 in all
    one.give(KEY, 3)
    assert take_all(one, 3) == 3
    # Shrinking while tokens are out: the extra ones vanish as they come back.
    assert one.take(KEY, 1) is False
    one.give(KEY, 3)
    assert take_all(one, 1) == 1


def test_a_dead_members_tokens_are_reaped(
    prefix: str, keepers: list[pykka.ActorRef[Any]]
) -> None:
    one, two, _ = members(prefix, keepers)
    assert take_all(one, 2) == 2
    keepers[0].stop()  # dies holding both tokens
    assert two.take(KEY, 2) is True and two.take(KEY, 2) is True
    assert two.take(KEY, 2) is False


def test_a_member_that_left_gives_everything_back(
    prefix: str, keepers: list[pykka.ActorRef[Any]]
) -> None:
    one, two, _ = members(prefix, keepers)
    assert take_all(one, 2) == 2
    one.leave(KEY)
    assert take_all(two, 2) == 2
    # A token reaching the waiter of a member that left is put back, not kept.
    two.give(KEY)
    assert one.wait(KEY, 1.0) is False
    assert two.take(KEY, 2) is True


def test_namespaces_do_not_share(keepers: list[pykka.ActorRef[Any]]) -> None:
    one = LocalLedger(f"eh-a-{uuid.uuid4().hex[:6]}", "m0", keepers[0])
    other = LocalLedger(f"eh-b-{uuid.uuid4().hex[:6]}", "m1", keepers[1])
    assert take_all(one, 1) == 1 and take_all(other, 1) == 1
