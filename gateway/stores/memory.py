"""The memory store: state in this worker's memory, bounded, lost on restart.

Buckets live in a dict kept in least-recently-used order (a dict remembers insertion order, so
re-inserting a key on use moves it to the end and the first key is the oldest): when a new key
would exceed `max_keys`, the least recently used one is dropped — it starts full when it comes
back, which errs on the side of admitting.

`take` has no suspension point: coroutines on one loop can never interleave inside it, which is
what makes the limit exact however many clients hammer one key at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import final

from gateway.core.token_bucket import Bucket, BucketPolicy
from gateway.stores.base import RateLimiter, Verdict


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
class MemoryStore:
    __slots__ = ("_clock",)

    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock

    def rate_limiter(
        self, *, namespace: str, rate: float, per: float, burst: int, max_keys: int
    ) -> RateLimiter:
        # each limiter has its own dict: the namespace matters only to shared stores
        return MemoryRateLimiter(BucketPolicy(rate, per, burst), max_keys, self._clock)

    async def aclose(self) -> None:
        return None
