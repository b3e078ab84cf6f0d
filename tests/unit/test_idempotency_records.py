"""The memory store's idempotency records: lock, conflicts, replay, release, expiry, and the
bounds (max_keys, max_bytes) that evict completed records oldest first and never a lock."""

from __future__ import annotations

import asyncio

import pytest

from gateway.stores.base import (
    IN_USE,
    NEW,
    REPLAY,
    REUSED,
    UNKNOWN,
    RecordsMeter,
    StoredResponse,
    StoreError,
)
from gateway.stores.memory import MemoryIdempotencyRecords, MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _records(clock: Clock) -> MemoryIdempotencyRecords:
    return _bounded(clock)[0]


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


# -- bounds (issue 11, defect 4) ----------------------------------------------------------------


def _bounded(
    clock: Clock, max_keys: int = 100, max_bytes: int = 1 << 20
) -> tuple[MemoryIdempotencyRecords, RecordsMeter]:
    meter = RecordsMeter()
    records = MemoryStore(clock).idempotency(
        namespace="t", max_keys=max_keys, max_bytes=max_bytes, meter=meter
    )
    assert isinstance(records, MemoryIdempotencyRecords)
    return records, meter


async def _done(records: MemoryIdempotencyRecords, key: str, body: bytes = b"") -> None:
    assert (await records.begin(key, "fp", 30)).outcome == NEW
    await records.complete(key, StoredResponse(200, [], body), ttl=3600)


async def _outcomes(records: MemoryIdempotencyRecords, *keys: str) -> list[str]:
    return [(await records.begin(key, "fp", 30)).outcome for key in keys]


async def test_max_keys_evicts_completed_records_oldest_first_and_counts() -> None:
    records, meter = _bounded(Clock(), max_keys=3)
    for key in ("a", "b", "c", "d", "e"):
        await _done(records, key)
    assert len(records) == 3
    assert (meter.evictions.value, meter.records.value) == (2, 3)
    assert await _outcomes(records, "c", "d", "e") == [REPLAY] * 3
    assert await _outcomes(records, "a") == [NEW]  # evicted: a repeat this late runs again


async def test_eviction_follows_completion_not_arrival() -> None:
    records, _ = _bounded(Clock(), max_keys=2)
    await records.begin("first", "fp", 30)
    await _done(records, "second")
    await records.complete("first", StoredResponse(200, [], b""), ttl=3600)
    await _done(records, "third")  # evicts "second", completed before "first"
    assert await _outcomes(records, "first", "third") == [REPLAY, REPLAY]
    assert await _outcomes(records, "second") == [NEW]


async def test_max_bytes_counts_keys_headers_and_bodies() -> None:
    records, meter = _bounded(Clock(), max_bytes=100)
    await records.begin("k1", "fp", 30)
    assert meter.size.value == 2  # a lock costs its key
    await records.complete("k1", StoredResponse(200, [(b"X-A", b"12")], b"x" * 40), ttl=60)
    assert meter.size.value == 2 + 5 + 40
    await _done(records, "k2", b"y" * 40)
    assert (meter.size.value, meter.evictions.value) == (2 + 5 + 40 + 2 + 40, 0)
    await _done(records, "k3", b"z" * 40)  # over 100 bytes: k1 goes
    assert (meter.size.value, meter.evictions.value) == (42 + 42, 1)
    assert await _outcomes(records, "k2", "k3", "k1") == [REPLAY, REPLAY, NEW]


@pytest.mark.parametrize(
    ("unfinished", "outcome"),
    [("in_flight", IN_USE), ("unknown_outcome", IN_USE), ("body_streaming", REPLAY)],
    ids=["in-flight", "unknown-outcome", "body-streaming"],
)
async def test_a_lock_is_never_evicted(unfinished: str, outcome: str) -> None:
    clock = Clock()
    records, meter = _bounded(clock, max_keys=3)
    await records.begin("held", "fp", lock_ttl=100)
    if unfinished == "body_streaming":
        pending = StoredResponse(200, [], b"", pending=True)
        await records.complete("held", pending, ttl=3600)
    for i in range(50):
        if unfinished == "unknown_outcome":
            clock.now += 1  # the first request timed out: kept until its lock runs out
        await _done(records, f"k{i}")
    assert len(records) == 3
    assert meter.evictions.value == 48
    held = await records.begin("held", "fp", 30)
    assert held.outcome == outcome  # still there: the stage answers 409 either way
    assert held.response is None or held.response.pending


async def test_only_locks_left_refuses_a_new_key_until_one_ends() -> None:
    records, meter = _bounded(Clock(), max_keys=2)
    await records.begin("a", "fp", 30)
    await records.begin("b", "fp", 30)
    with pytest.raises(StoreError, match="in flight"):
        await records.begin("c", "fp", 30)
    assert await _outcomes(records, "a") == [IN_USE]  # known keys still answer
    await records.release("a")
    assert await _outcomes(records, "c") == [NEW]
    assert meter.evictions.value == 0


async def test_locks_filling_max_bytes_refuse_a_new_key() -> None:
    records, _ = _bounded(Clock(), max_bytes=10)
    await _done(records, "done")
    await records.begin("lock-1", "fp", 30)
    with pytest.raises(StoreError):
        await records.begin("lock-2", "fp", 30)  # 6 + 6 > 10 even without "done"
    assert await _outcomes(records, "done") == [REPLAY]  # and nothing was evicted in vain


async def test_a_response_that_cannot_fit_is_kept_as_done_not_replayable() -> None:
    records, meter = _bounded(Clock(), max_bytes=20)
    await records.begin("lock", "fp", 30)
    await records.begin("big", "fp", 30)
    await records.complete("big", StoredResponse(200, [], b"x" * 30), ttl=60)
    replay = await records.begin("big", "fp", 30)
    assert replay.outcome == REPLAY
    assert replay.response is not None
    assert (replay.response.replayable, replay.response.body) == (False, b"")
    assert meter.size.value == len("lock") + len("big")


async def test_expired_records_make_room_without_counting_as_evictions() -> None:
    clock = Clock()
    records, meter = _bounded(clock, max_keys=2)
    await _done(records, "a")
    await _done(records, "b")
    clock.now += 3601
    await _done(records, "c")
    await _done(records, "d")
    assert meter.evictions.value == 0
    assert len(records) == 2


async def test_bounds_come_with_the_stage_and_the_records_with_the_namespace() -> None:
    store = MemoryStore(Clock())
    meter = RecordsMeter()
    wide = store.idempotency(namespace="t", max_keys=10, max_bytes=1 << 20, meter=meter)
    for key in "abcde":
        await wide.begin(key, "fp", 30)
        await wide.complete(key, StoredResponse(200, [], b""), ttl=60)
    # a reload that narrows the stage: the same records, the new bound on the next admission
    narrow = store.idempotency(namespace="t", max_keys=3, max_bytes=1 << 20, meter=meter)
    assert (await narrow.begin("e", "fp", 30)).outcome == REPLAY
    assert (await narrow.begin("f", "fp", 30)).outcome == NEW
    assert meter.records.value == 3
    assert (await wide.begin("a", "fp", 30)).outcome == NEW  # evicted by the narrow one


async def test_an_unknown_outcome_is_kept_for_the_ttl_and_never_released() -> None:
    clock = Clock()
    records = _records(clock)
    await records.begin("k", "fp", lock_ttl=30)
    await records.mark_unknown("k", "fp", ttl=3600)
    await records.release("k")  # a late release never frees an unknown outcome
    clock.now += 3599
    assert (await records.begin("k", "fp", 30)).outcome == UNKNOWN
    assert (await records.begin("k", "other", 30)).outcome == REUSED
    clock.now += 2
    assert (await records.begin("k", "fp", 30)).outcome == NEW


async def test_a_streaming_response_can_be_released_a_complete_one_cannot() -> None:
    """A body that broke off, for an upstream that de-duplicates by the key: released."""
    records = _records(Clock())
    await records.begin("k", "fp", lock_ttl=30)
    await records.complete("k", StoredResponse(200, [], b"", pending=True), ttl=60)
    assert (await records.begin("k", "fp", 30)).outcome == REPLAY  # pending: the stage says 409
    await records.release("k")
    assert (await records.begin("k", "fp", 30)).outcome == NEW
    await records.complete("k", StoredResponse(200, [], b"done"), ttl=60)
    await records.release("k")
    assert (await records.begin("k", "fp", 30)).outcome == REPLAY
