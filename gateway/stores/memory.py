"""The memory store: state in this worker's memory, bounded, lost on restart.

Buckets live in a dict kept in least-recently-used order (a dict remembers insertion order, so
re-inserting a key on use moves it to the end and the first key is the oldest): when a new key
would exceed `max_keys`, the least recently used one is dropped — it starts full when it comes
back, which errs on the side of admitting.

`take` has no suspension point: coroutines on one loop can never interleave inside it, which is
what makes the limit exact however many clients hammer one key at once.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import final

from gateway.core.token_bucket import Bucket, BucketPolicy
from gateway.stores.base import (
    IN_USE,
    NEW,
    REPLAY,
    REUSED,
    Begin,
    IdempotencyRecords,
    RateLimiter,
    StoredResponse,
    Verdict,
)


@final
class MemoryRateLimiter:
    __slots__ = ("_buckets", "_clock", "_max_keys", "_policy")

    def __init__(self, policy: BucketPolicy, max_keys: int, clock: Callable[[], float]) -> None:
        self._policy = policy
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: dict[str, Bucket] = {}

    def take_now(self, key: str) -> Verdict:
        policy = self._policy
        buckets = self._buckets
        now = self._clock()
        bucket = buckets.pop(key, None)
        if bucket is None:
            bucket = policy.new(now)
            if len(buckets) >= self._max_keys:
                del buckets[next(iter(buckets))]
        buckets[key] = bucket  # (re)inserted last: the most recently used
        allowed = policy.take(bucket, now)
        return Verdict(
            allowed,
            policy.remaining(bucket),
            policy.seconds_to_full(bucket),
            0.0 if allowed else policy.seconds_to_token(bucket),
        )

    async def take(self, key: str) -> Verdict:
        return self.take_now(key)

    def __len__(self) -> int:
        return len(self._buckets)

    def close(self) -> None:
        self._buckets.clear()


@final
class _Record:
    __slots__ = ("expires", "fingerprint", "response")

    def __init__(self, fingerprint: str, expires: float) -> None:
        self.fingerprint = fingerprint
        #: the lock's end while in flight, the record's end once complete
        self.expires = expires
        #: None while the first request runs (or its outcome is unknown)
        self.response: StoredResponse | None = None


@final
class MemoryIdempotencyRecords:
    """Records in this worker's memory: lost on restart, not shared between workers.

    No await inside `begin`: checking for a record and taking the lock happen in one step of
    the event loop, so concurrent duplicates cannot both see "no record".
    """

    __slots__ = ("_clock", "_records")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._records: dict[str, _Record] = {}

    def begin_now(self, key: str, fingerprint: str, lock_ttl: float) -> Begin:
        now = self._clock()
        record = self._records.get(key)
        if record is not None and record.expires <= now:
            del self._records[key]
            record = None
        if record is None:
            self._records[key] = _Record(fingerprint, now + lock_ttl)
            self._sweep(now)
            return Begin(NEW)
        if record.fingerprint != fingerprint:
            return Begin(REUSED)
        if record.response is None:
            return Begin(IN_USE, retry_after=record.expires - now)
        return Begin(REPLAY, record.response)

    async def begin(self, key: str, fingerprint: str, lock_ttl: float) -> Begin:
        return self.begin_now(key, fingerprint, lock_ttl)

    async def complete(self, key: str, response: StoredResponse, ttl: float) -> None:
        record = self._records.get(key)
        if record is None:
            return  # it expired meanwhile: nothing to keep the answer against
        record.response = response
        record.expires = self._clock() + ttl
        # re-inserted last: the dict stays (roughly) in order of expiry for the sweep
        del self._records[key]
        self._records[key] = record

    async def release(self, key: str) -> None:
        record = self._records.get(key)
        if record is not None and record.response is None:
            del self._records[key]

    def _sweep(self, now: float, budget: int = 8) -> None:
        """Drop a few expired records from the front (oldest first): O(1) amortised."""
        records = self._records
        for key in list(itertools.islice(records, budget)):
            if records[key].expires <= now:
                del records[key]

    def __len__(self) -> int:
        return len(self._records)

    async def close(self) -> None:
        self._records.clear()


@final
class MemoryStore:
    __slots__ = ("_clock", "_records")

    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: idempotency records by namespace: they outlive a stage whose settings changed, so a
        #: reload never lets a duplicate through
        self._records: dict[str, MemoryIdempotencyRecords] = {}

    def rate_limiter(
        self, *, namespace: str, rate: float, per: float, burst: int, max_keys: int
    ) -> RateLimiter:
        # each limiter has its own dict: the namespace matters only to shared stores
        return MemoryRateLimiter(BucketPolicy(rate, per, burst), max_keys, self._clock)

    def idempotency(self, *, namespace: str) -> IdempotencyRecords:
        records = self._records.get(namespace)
        if records is None:
            records = self._records[namespace] = MemoryIdempotencyRecords(self._clock)
        return records

    async def aclose(self) -> None:
        return None
