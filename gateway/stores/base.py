"""The store Protocols: what a stage needs from where its shared state lives.

A stage picks its store once, when it is built (`memory`, always there and per worker, or a
named shared store), and then only calls these methods.  The memory store answers at once; a
Redis store (a later addition) must not cost a round trip per request: its `RateLimiter.take`
spends tokens from a lease held locally — a share of the bucket reserved with one atomic script
— and tops the lease up in the background when it runs low, so a hot key costs one round trip
per batch.  Across replicas the admitted count may then exceed the limit by at most the tokens
leased and not yet spent.  A store that cannot answer raises `StoreError`; the stage decides
(`on_store_error`) whether that fails open or closed.
"""

from __future__ import annotations

from typing import Protocol, final


class StoreError(Exception):
    """The store could not answer (unreachable, timed out, refused)."""


@final
class Verdict:
    """One take's answer; a plain slotted class, built once per limited request."""

    __slots__ = ("allowed", "remaining", "reset_after", "retry_after")

    def __init__(
        self, allowed: bool, remaining: int, reset_after: float, retry_after: float
    ) -> None:
        self.allowed = allowed
        #: whole tokens left after this request
        self.remaining = remaining
        #: seconds until the bucket is full again
        self.reset_after = reset_after
        #: seconds until one token is available (0.0 when allowed)
        self.retry_after = retry_after


class RateLimiter(Protocol):
    """Token buckets of one policy, by key."""

    async def take(self, key: str) -> Verdict: ...

    def close(self) -> None: ...


class Store(Protocol):
    name: str

    def rate_limiter(
        self, *, namespace: str, rate: float, per: float, burst: int, max_keys: int
    ) -> RateLimiter: ...

    async def aclose(self) -> None: ...
