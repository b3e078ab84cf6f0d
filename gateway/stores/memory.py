"""The memory store: state in this worker's memory, bounded, lost on restart.

Buckets live in a dict kept in least-recently-used order (a dict remembers insertion order, so
re-inserting a key on use moves it to the end and the first key is the oldest): when a new key
would exceed `max_keys`, the least recently used one is dropped — it starts full when it comes
back, which errs on the side of admitting.

`take` has no suspension point: coroutines on one loop can never interleave inside it, which is
what makes the limit exact however many clients hammer one key at once.

Idempotency records are bounded the same way, by `max_keys` and by `max_bytes` of keys and stored
responses, but only completed records are ever dropped, oldest first (see
`MemoryIdempotencyRecords`).
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import final

from gateway.core.token_bucket import Bucket, BucketPolicy
from gateway.stores.base import (
    IN_USE,
    NEW,
    REPLAY,
    REUSED,
    UNKNOWN,
    Begin,
    IdempotencyRecords,
    RateLimiter,
    RecordsMeter,
    StoredResponse,
    StoreError,
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
    __slots__ = ("expires", "fingerprint", "response", "size", "unknown")

    def __init__(self, fingerprint: str, expires: float, size: int) -> None:
        self.fingerprint = fingerprint
        #: the request may have run and no complete answer came back: repeats get 409 for the
        #: ttl (a lock, never evicted)
        self.unknown = False
        #: the lock's end while in flight, the record's end once complete
        self.expires = expires
        #: None while the first request runs (or its outcome is unknown); pending while the
        #: first response's body streams
        self.response: StoredResponse | None = None
        #: bytes counted against max_bytes: the key, the stored headers and body
        self.size = size

    @property
    def is_done(self) -> bool:
        """Completed: evictable, unlike a lock (in flight, streaming or outcome unknown)."""
        response = self.response
        return response is not None and not response.pending


def _stored_size(response: StoredResponse) -> int:
    return len(response.body) + sum(len(name) + len(value) for name, value in response.headers)


@final
class _Table:
    """One namespace's records, shared by every instance of its stage across reloads.

    Locks and completed records are kept apart, each in the order it was added, so eviction
    takes the oldest completed record in O(1) and can never reach a lock.  OrderedDict rather
    than dict: its first item is found through a linked list, while a dict's is found by
    scanning past the holes that deletions at its front leave, which makes repeated
    oldest-first removal quadratic.
    """

    __slots__ = ("done", "done_bytes", "lock_bytes", "locks", "meter")

    def __init__(self, meter: RecordsMeter) -> None:
        #: in flight, streaming or of unknown outcome: released, completed or expired, never
        #: evicted
        self.locks: OrderedDict[str, _Record] = OrderedDict()
        #: completed, oldest first (their ttl is the stage's, so this is also expiry order)
        self.done: OrderedDict[str, _Record] = OrderedDict()
        self.lock_bytes = 0
        self.done_bytes = 0
        self.meter = meter

    def find(self, key: str) -> _Record | None:
        record = self.locks.get(key)
        return record if record is not None else self.done.get(key)

    def add(self, key: str, record: _Record) -> None:
        if record.is_done:
            self.done[key] = record
            self.done_bytes += record.size
        else:
            self.locks[key] = record
            self.lock_bytes += record.size

    def remove(self, key: str, record: _Record) -> None:
        if record.is_done:
            del self.done[key]
            self.done_bytes -= record.size
        else:
            del self.locks[key]
            self.lock_bytes -= record.size

    def report(self) -> None:
        meter = self.meter
        meter.records.set(len(self.locks) + len(self.done))
        meter.size.set(self.lock_bytes + self.done_bytes)

    def clear(self) -> None:
        self.locks.clear()
        self.done.clear()
        self.lock_bytes = self.done_bytes = 0
        self.report()


@final
class MemoryIdempotencyRecords:
    """Records in this worker's memory: lost on restart, not shared between workers.

    The records of a namespace (`_Table`) outlive the stage: a reload hands the same table to
    the new stage's instance, with that stage's bounds, so a discarded reload changes nothing.
    Admitting a new key first sweeps a few expired records, then evicts completed ones, oldest
    first, until one more fits under `max_keys` and `max_bytes`; when only locks are left it
    raises `StoreError` (the stage's `on_store_error` decides).  Completing a record may evict
    too; an answer that cannot fit even so is kept as "ran, not replayable" — the lock it
    replaces already held that much.

    No await anywhere here: checking for a record and taking the lock happen in one step of
    the event loop, so concurrent duplicates cannot both see "no record".
    """

    __slots__ = ("_clock", "_max_bytes", "_max_keys", "_table")

    def __init__(
        self, table: _Table, max_keys: int, max_bytes: int, clock: Callable[[], float]
    ) -> None:
        self._table = table
        self._max_keys = max_keys
        self._max_bytes = max_bytes
        self._clock = clock

    def begin_now(self, key: str, fingerprint: str, lock_ttl: float) -> Begin:
        now = self._clock()
        table = self._table
        record = table.find(key)
        if record is not None and record.expires <= now:
            table.remove(key, record)
            record = None
        if record is None:
            self._sweep(now)
            if not self._make_room(now, len(key), new_keys=1):
                table.report()
                raise StoreError(
                    f"no room for a new idempotency key: {len(table.locks)} requests in flight"
                    f" hold max_keys={self._max_keys} / max_bytes={self._max_bytes}"
                )
            table.add(key, _Record(fingerprint, now + lock_ttl, len(key)))
            table.report()
            return Begin(NEW)
        if record.fingerprint != fingerprint:
            return Begin(REUSED)
        if record.unknown:
            return Begin(UNKNOWN)
        if record.response is None:
            return Begin(IN_USE, retry_after=record.expires - now)
        return Begin(REPLAY, record.response)

    async def begin(self, key: str, fingerprint: str, lock_ttl: float) -> Begin:
        return self.begin_now(key, fingerprint, lock_ttl)

    async def complete(self, key: str, response: StoredResponse, ttl: float) -> None:
        table = self._table
        record = table.find(key)
        if record is None:
            return  # it expired meanwhile: nothing to keep the answer against
        now = self._clock()
        table.remove(key, record)  # taken out while room is made: it cannot evict itself
        size = len(key) + _stored_size(response)
        if not self._make_room(now, size, new_keys=0):
            # the locks alone fill max_bytes: keep that the request ran, never its answer
            response = StoredResponse(
                response.status, [], b"", replayable=False, pending=response.pending
            )
            size = len(key)
        record.response = response
        record.expires = now + ttl
        record.size = size
        table.add(key, record)  # last: the newest completed record, evicted last
        table.report()

    async def release(self, key: str) -> None:
        table = self._table
        record = table.locks.get(key)
        # a lock, or a response whose body broke off (never an unknown outcome)
        if record is not None and not record.unknown:
            table.remove(key, record)
            table.report()

    async def mark_unknown(self, key: str, fingerprint: str, ttl: float) -> None:
        table = self._table
        record = table.find(key)
        if record is None:
            # it expired meanwhile (a lock outlived by its request): keep the key unknown anyway
            record = _Record(fingerprint, 0.0, len(key))
        else:
            table.remove(key, record)
        record.response = None
        record.unknown = True
        record.expires = self._clock() + ttl
        record.size = len(key)
        table.add(key, record)  # a lock: never evicted
        table.report()

    def _make_room(self, now: float, size: int, *, new_keys: int) -> bool:
        """Evict completed records, oldest first, until `size` more bytes (and `new_keys` more
        keys) fit; False, having evicted nothing, when they could not fit even without any."""
        table = self._table
        locks, done = table.locks, table.done
        max_keys, max_bytes = self._max_keys, self._max_bytes
        if len(locks) + new_keys > max_keys or table.lock_bytes + size > max_bytes:
            return False
        while (
            len(locks) + len(done) + new_keys > max_keys
            or table.lock_bytes + table.done_bytes + size > max_bytes
        ):
            _, oldest = done.popitem(last=False)
            table.done_bytes -= oldest.size
            if oldest.expires > now:  # an expired one was due anyway: not an eviction
                table.meter.evictions.inc()
        return True

    def _sweep(self, now: float, budget: int = 8) -> None:
        """Drop a few expired records from the front of each (oldest first): O(1) amortised."""
        table = self._table
        for records in (table.locks, table.done):
            for key, record in list(itertools.islice(records.items(), budget)):
                if record.expires <= now:
                    table.remove(key, record)

    def __len__(self) -> int:
        return len(self._table.locks) + len(self._table.done)

    async def close(self) -> None:
        self._table.clear()


@final
class MemoryStore:
    __slots__ = ("_clock", "_tables")

    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: idempotency records by namespace: they outlive a stage whose settings changed, so a
        #: reload never lets a duplicate through
        self._tables: dict[str, _Table] = {}

    def rate_limiter(
        self, *, namespace: str, rate: float, per: float, burst: int, max_keys: int
    ) -> RateLimiter:
        # each limiter has its own dict: the namespace matters only to shared stores
        return MemoryRateLimiter(BucketPolicy(rate, per, burst), max_keys, self._clock)

    def idempotency(
        self, *, namespace: str, max_keys: int, max_bytes: int, meter: RecordsMeter
    ) -> IdempotencyRecords:
        table = self._tables.get(namespace)
        if table is None:
            table = self._tables[namespace] = _Table(meter)
        return MemoryIdempotencyRecords(table, max_keys, max_bytes, self._clock)

    async def aclose(self) -> None:
        return None
