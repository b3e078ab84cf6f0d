"""The token bucket: `rate` tokens per second refill continuously up to `burst`.

Pure: time is passed in (monotonic seconds), nothing is read from a clock.  A bucket is two
floats; a new one starts full.  Refill is computed on use, from the time elapsed since the last
use, so an idle bucket costs nothing.  Time that goes backwards adds no tokens.

Exactness: over T seconds of constant demand a bucket admits burst + floor(rate * T) requests.
Comparisons allow a tiny epsilon so that a token which is due exactly now is not refused
because of float rounding in the refill arithmetic.
"""

from __future__ import annotations

from typing import Final, final

#: tokens within this of a whole one count as a whole one (float rounding, never a real gain)
_EPSILON: Final = 1e-9


@final
class Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


@final
class BucketPolicy:
    """`rate` tokens every `per` seconds, at most `burst` held."""

    __slots__ = ("burst", "per_second")

    def __init__(self, rate: float, per: float, burst: int) -> None:
        if rate <= 0 or per <= 0 or burst < 1:
            raise ValueError("rate and per must be > 0 and burst >= 1")
        self.per_second = rate / per
        self.burst = float(burst)

    def new(self, now: float) -> Bucket:
        return Bucket(self.burst, now)

    def refill(self, bucket: Bucket, now: float) -> float:
        """Bring `bucket` up to `now`; its tokens."""
        elapsed = now - bucket.updated
        if elapsed > 0:
            tokens = bucket.tokens + elapsed * self.per_second
            bucket.tokens = tokens if tokens < self.burst else self.burst
            bucket.updated = now
        return bucket.tokens

    def take(self, bucket: Bucket, now: float, cost: float = 1.0) -> bool:
        """Take `cost` tokens if the bucket holds them."""
        tokens = self.refill(bucket, now)
        if tokens + _EPSILON >= cost:
            # never below zero: the epsilon must not turn into a debt
            bucket.tokens = max(0.0, tokens - cost)
            return True
        return False

    def remaining(self, bucket: Bucket) -> int:
        """Whole tokens left (after `refill`)."""
        return int(bucket.tokens + _EPSILON)

    def seconds_to_full(self, bucket: Bucket) -> float:
        return max(0.0, (self.burst - bucket.tokens) / self.per_second)

    def seconds_to_token(self, bucket: Bucket, cost: float = 1.0) -> float:
        """How long until `cost` tokens are there; 0 when they already are."""
        missing = cost - bucket.tokens - _EPSILON
        return missing / self.per_second if missing > 0 else 0.0
