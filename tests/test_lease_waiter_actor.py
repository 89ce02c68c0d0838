"""The LeaseWaiter actor, through its messages, against the real Redis.

A recorder stands in for the keeper. Two LeaseStores with different process
ids stand in for two processes of a fleet sharing one budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pykka
import pytest
import redis
from fleet_fixtures import SHARED_REDIS

from enginehouse import fleet
from enginehouse.actors.lease_waiter import LeaseWaiter
from enginehouse.messages.budget import StartWaiting, StopWaiting, WaitEnded

pytestmark = pytest.mark.services("redis")

BUDGET = "db:waiter-test"
TTL = 30.0


@pytest.fixture
def stores(fleet_prefix: str) -> Iterator[tuple[fleet.LeaseStore, fleet.LeaseStore]]:
    one = fleet.LeaseStore(SHARED_REDIS, prefix=fleet_prefix, process="one", timeout=1.0)
    two = fleet.LeaseStore(SHARED_REDIS, prefix=fleet_prefix, process="two", timeout=1.0)
    yield one, two
    one.close()
    two.close()


def blocked_in_redis() -> int:
    """Clients blocked in a blocking command on the shared Redis (ours: the waiter's BLMOVE)."""
    client = redis.Redis.from_url(SHARED_REDIS)
    try:
        return int(client.info("clients")["blocked_clients"])
    finally:
        client.close()


def waited(recorder: pykka.ActorRef[Any]) -> list[WaitEnded]:
    return [m for m in recorder.ask("seen", timeout=5) if isinstance(m, WaitEnded)]


def test_a_permit_freed_elsewhere_wakes_the_waiter_in_one_round_trip(
    stores: tuple[fleet.LeaseStore, fleet.LeaseStore], recorder: pykka.ActorRef[Any], poll: Any
) -> None:
    one, two = stores
    assert one.take(BUDGET, 1, TTL) == (True, 1, 0)
    granted, held, waiting = two.take(BUDGET, 1, TTL)
    assert (granted, held, waiting) == (False, 1, 0)  # refused; nobody else waits
    renewal = one.renew(BUDGET, 1, TTL, 1, False, 0)
    assert (renewal.held, renewal.others_waiting, renewal.processes) == (1, 1, 2)
    waiter = LeaseWaiter.start(recorder, two.channel(), BUDGET, block=5.0)
    try:
        waiter.tell(StartWaiting())
        poll(blocked_in_redis, what="the waiter to block in Redis")
        assert waited(recorder) == []  # nothing freed: it blocks in Redis, it does not poll
        one.give(BUDGET, 1, TTL, 1)
        poll(lambda: waited(recorder), what="the waiter's news")
        assert waited(recorder) == [WaitEnded(BUDGET, got=True, answered=1)]
        # The permit is now the second process's in Redis: the first cannot take it.
        assert one.take(BUDGET, 1, TTL)[0] is False
    finally:
        waiter.tell(StopWaiting())
        waiter.stop(block=False)


def test_enough_stops_the_waiting(
    stores: tuple[fleet.LeaseStore, fleet.LeaseStore], recorder: pykka.ActorRef[Any], poll: Any
) -> None:
    one, two = stores
    assert one.take(BUDGET, 1, TTL)[0] is True
    assert two.take(BUDGET, 1, TTL)[0] is False
    waiter = LeaseWaiter.start(recorder, two.channel(), BUDGET, block=0.2)
    try:
        waiter.tell(StartWaiting())
        poll(lambda: waited(recorder), what="one empty wait")  # 0.2 s blocks, nothing freed
        assert all(not m.got and not m.failed for m in waited(recorder))
        waiter.tell(StopWaiting())
        settled = len(waited(recorder))
        one.give(BUDGET, 1, TTL, 1)
        # At most the wait already under way ends; then no more waits are made.
        poll(lambda: one.take(BUDGET, 1, TTL)[0] or len(waited(recorder)) > settled,
             what="the freed permit to stay free or reach the waiter once")
        assert len(waited(recorder)) <= settled + 1
    finally:
        waiter.stop()


def test_one_start_catches_one_permit_however_many_are_free(
    stores: tuple[fleet.LeaseStore, fleet.LeaseStore], recorder: pykka.ActorRef[Any], poll: Any
) -> None:
    """Each StartWaiting asks for one permit; the waiter then stops until asked again.

    A waiter that went on catching permits before its keeper had read the first left
    more permits in the process's Redis list than the keeper's renewal allowed for;
    the renewal took one back while its connection opened, and another process got it:
    7 connections under a cap of 6 (tests/test_fleet_redis.py, about 1 run in 10).
    """
    one, two = stores
    assert one.take(BUDGET, 2, TTL)[0] is True
    assert one.take(BUDGET, 2, TTL)[0] is True
    assert two.take(BUDGET, 2, TTL)[0] is False
    one.give(BUDGET, 2, TTL, 2)  # two permits free before the waiter starts
    client = redis.Redis.from_url(SHARED_REDIS)
    waiter = LeaseWaiter.start(recorder, two.channel(), BUDGET, block=0.2)
    try:
        waiter.tell(StartWaiting())
        poll(lambda: waited(recorder), what="the waiter's catch")
        # Nothing more is caught: the second permit stays free for anyone to take.
        assert one.take(BUDGET, 2, TTL)[0] is True
        assert client.llen(two.keys(BUDGET)[3]) == 1
        assert waited(recorder) == [WaitEnded(BUDGET, got=True, answered=1)]
        one.give(BUDGET, 2, TTL, 1)
        waiter.tell(StartWaiting())  # asked again: it catches the next permit
        poll(lambda: len(waited(recorder)) > 1, what="the second catch")
        assert [m.got for m in waited(recorder) if m.answered] == [True, True]
        waiter.tell(StopWaiting())  # nothing asked for any more: no answer owed
        assert waiter.ask(StopWaiting(), timeout=5) is None
        assert all(not m.stopped for m in waited(recorder))
    finally:
        waiter.stop()
        client.close()


def test_a_stop_answers_every_start_still_open(
    stores: tuple[fleet.LeaseStore, fleet.LeaseStore], recorder: pykka.ActorRef[Any], poll: Any
) -> None:
    """The keeper counts permits that may be on their way; a stop tells it none will come."""
    one, two = stores
    assert one.take(BUDGET, 1, TTL)[0] is True
    assert two.take(BUDGET, 1, TTL)[0] is False
    waiter = LeaseWaiter.start(recorder, two.channel(), BUDGET, block=0.2)
    try:
        waiter.tell(StartWaiting())
        waiter.tell(StartWaiting())
        waiter.tell(StopWaiting())
        poll(lambda: any(m.stopped for m in waited(recorder)), what="the stop's answer")
        stops = [m for m in waited(recorder) if m.stopped]
        assert stops == [WaitEnded(BUDGET, got=False, stopped=True, answered=2)]
        assert sum(m.answered for m in waited(recorder)) == 2
    finally:
        waiter.stop()


def test_a_give_asked_twice_gives_once(
    stores: tuple[fleet.LeaseStore, fleet.LeaseStore],
) -> None:
    """The keeper asks again after a late reply; the script may then have run twice.

    Run twice, a give used to free a permit that a live connection held, and the
    fleet went one over its cap. The give's id makes the second run give nothing.
    """
    one, two = stores
    assert one.take(BUDGET, 3, TTL)[0] is True
    assert one.take(BUDGET, 3, TTL)[0] is True
    assert one.give(BUDGET, 3, TTL, 1, "g1") == (1, 0)  # one connection closed, one still open
    assert one.give(BUDGET, 3, TTL, 1, "g1") == (1, 0)  # the same give again: nothing moves
    assert [two.take(BUDGET, 3, TTL)[0] for _ in range(3)] == [True, True, False]
    assert one.give(BUDGET, 3, TTL, 1, "g2") == (2, 1)  # the next give does (two waits)


def test_a_dead_redis_is_reported_as_failed(recorder: pykka.ActorRef[Any], poll: Any) -> None:
    from fleet_fixtures import free_port

    store = fleet.LeaseStore(
        f"redis://127.0.0.1:{free_port()}/0", prefix="eh-none", process="p", timeout=0.5
    )
    waiter = LeaseWaiter.start(recorder, store.channel(), BUDGET, block=0.2)
    try:
        waiter.tell(StartWaiting())
        poll(lambda: waited(recorder), what="the failure")
        assert waited(recorder) == [WaitEnded(BUDGET, got=False, failed=True, answered=1)]
    finally:
        waiter.stop()
        store.close()


def test_unknown_messages_are_refused(
    stores: tuple[fleet.LeaseStore, fleet.LeaseStore], recorder: pykka.ActorRef[Any]
) -> None:
    waiter = LeaseWaiter.start(recorder, stores[0].channel(), BUDGET)
    try:
        with pytest.raises(TypeError, match="unexpected message"):
            waiter.ask("hello", timeout=5)
    finally:
        waiter.stop()


def test_a_permit_reaching_a_waiter_whose_keeper_stopped_goes_back(
    stores: tuple[fleet.LeaseStore, fleet.LeaseStore], poll: Any
) -> None:
    from conftest import Recorder

    one, two = stores
    assert one.take(BUDGET, 1, TTL)[0] is True
    assert two.take(BUDGET, 1, TTL)[0] is False
    keeper = Recorder.start()
    waiter = LeaseWaiter.start(keeper, two.channel(), BUDGET, block=5.0)
    try:
        waiter.tell(StartWaiting())
        poll(blocked_in_redis, what="the waiter to block in Redis")
        keeper.stop()  # the keeper is gone while its waiter blocks in Redis
        one.give(BUDGET, 1, TTL, 1)
        # The waiter got the permit, found no keeper, and put it back on the free list
        # itself (no script has run since to recount the free list).
        client = redis.Redis.from_url(SHARED_REDIS)
        try:
            poll(lambda: client.llen(two.keys(BUDGET)[0]) == 1, what="the permit to be free")
            assert client.llen(two.keys(BUDGET)[3]) == 0
        finally:
            client.close()
    finally:
        waiter.stop()


def test_a_permit_caught_while_the_keeper_shuts_down_goes_back(
    fleet_prefix: str, poll: Any
) -> None:
    """A manager shutting down while its waiter still blocks in Redis loses no permit:
    the waiter's own connection stays open to put back what it catches."""
    from enginehouse import EngineManager

    settings = {"fleet_url": SHARED_REDIS, "fleet_prefix": fleet_prefix,
                "cleanup_interval": 30, "fleet_lease_ttl": 90, "ask_timeout": 10}
    other = fleet.LeaseStore(SHARED_REDIS, prefix=fleet_prefix, process="other", timeout=1.0)
    try:
        with EngineManager(**settings) as manager:
            assert other.take(BUDGET, 1, TTL)[0] is True
            with pytest.raises(Exception, match="pool_timeout"):
                manager._budgets.acquire(BUDGET, 1, 0.2)  # refused: its waiter blocks (5 s)
            poll(blocked_in_redis, what="the waiter to block in Redis")
        # The manager is gone, its waiter still blocks: give the permit back now.
        other.give(BUDGET, 1, TTL, 1)
        client = redis.Redis.from_url(SHARED_REDIS)
        try:
            poll(lambda: client.llen(other.keys(BUDGET)[0]) == 1, what="the permit to be free")
        finally:
            client.close()
    finally:
        other.close()


def test_a_wait_redis_refuses_is_reported_not_raised(
    stores: tuple[fleet.LeaseStore, fleet.LeaseStore], recorder: pykka.ActorRef[Any], poll: Any
) -> None:
    """Redis answering BLMOVE with an error (here WRONGTYPE) must not kill the waiter silently."""
    one, _ = stores
    free = one.keys(BUDGET)[0]
    client = redis.Redis.from_url(SHARED_REDIS)
    client.set(free, "not a list")
    waiter = LeaseWaiter.start(recorder, one.channel(), BUDGET, block=0.2)
    try:
        waiter.tell(StartWaiting())
        poll(lambda: waited(recorder), what="the refusal")
        assert waited(recorder) == [
            WaitEnded(BUDGET, got=False, failed=True, refused="WRONGTYPE", answered=1)
        ]
        assert waiter.is_alive()  # it stopped waiting; its keeper decides what comes next
    finally:
        waiter.stop()
        client.delete(free)
        client.close()


def test_a_crashed_waiter_tells_its_keeper(
    stores: tuple[fleet.LeaseStore, fleet.LeaseStore], recorder: pykka.ActorRef[Any], poll: Any
) -> None:
    waiter = LeaseWaiter.start(recorder, stores[0].channel(), BUDGET, block=0.2)
    waiter.tell("crash")  # an unexpected message told, not asked: the actor dies
    poll(lambda: not waiter.is_alive(), what="the waiter to die")
    poll(lambda: waited(recorder), what="its last word")
    assert waited(recorder) == [WaitEnded(BUDGET, got=False, failed=True)]
