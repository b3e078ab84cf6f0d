"""The memory store's idempotency records: lock, conflicts, replay, release, expiry."""

from __future__ import annotations

import asyncio

from gateway.stores.base import IN_USE, NEW, REPLAY, REUSED, StoredResponse
from gateway.stores.memory import MemoryIdempotencyRecords, MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _records(clock: Clock) -> MemoryIdempotencyRecords:
    records = MemoryStore(clock).idempotency(namespace="t")
    assert isinstance(records, MemoryIdempotencyRecords)
    return records


async def test_first_locks_duplicates_wait_then_replay() -> None:
    clock = Clock()
    records = _records(clock)
    assert (await records.begin("k", "fp", lock_ttl=30)).outcome == NEW
    busy = await records.begin("k", "fp", lock_ttl=30)
    assert busy.outcome == IN_USE
    assert busy.retry_after == 30
    assert (await records.begin("k", "other", lock_ttl=30)).outcome == REUSED
    await records.complete("k", StoredResponse(201, [(b"X-A", b"1")], b"made"), ttl=3600)
    replay = await records.begin("k", "fp", lock_ttl=30)
    assert replay.outcome == REPLAY
    assert replay.response is not None
    assert (replay.response.status, replay.response.body) == (201, b"made")
    assert (await records.begin("k", "other", lock_ttl=30)).outcome == REUSED


async def test_exactly_one_of_many_concurrent_duplicates_goes_first() -> None:
    records = _records(Clock())
    outcomes = await asyncio.gather(*(records.begin("k", "fp", 30) for _ in range(50)))
    assert [o.outcome for o in outcomes].count(NEW) == 1
    assert [o.outcome for o in outcomes].count(IN_USE) == 49


async def test_release_lets_the_client_try_again_but_never_drops_a_stored_answer() -> None:
    clock = Clock()
    records = _records(clock)
    await records.begin("k", "fp", 30)
    await records.release("k")
    assert (await records.begin("k", "fp", 30)).outcome == NEW
    await records.complete("k", StoredResponse(200, [], b""), ttl=60)
    await records.release("k")
    assert (await records.begin("k", "fp", 30)).outcome == REPLAY


async def test_an_unknown_outcome_holds_the_lock_until_it_expires() -> None:
    clock = Clock()
    records = _records(clock)
    await records.begin("k", "fp", lock_ttl=30)  # then neither completed nor released
    clock.now += 29
    assert (await records.begin("k", "fp", 30)).outcome == IN_USE
    clock.now += 1
    assert (await records.begin("k", "fp", 30)).outcome == NEW


async def test_records_expire_after_their_ttl_and_are_swept() -> None:
    clock = Clock()
    records = _records(clock)
    for i in range(20):
        await records.begin(f"k{i}", "fp", 30)
        await records.complete(f"k{i}", StoredResponse(200, [], b""), ttl=60)
    assert len(records) == 20
    clock.now += 61
    assert (await records.begin("k0", "fp", 30)).outcome == NEW
    for i in range(3):  # each new record sweeps a few expired ones from the front
        await records.begin(f"new{i}", "fp", 30)
    assert len(records) < 10
    await records.close()
    assert len(records) == 0
