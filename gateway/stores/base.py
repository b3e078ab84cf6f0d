"""The store Protocols: what a stage needs from where its shared state lives.

A stage picks its store once, when it is built (`memory`, always there and per worker, or a
named shared store), and then only calls these methods. The memory store answers at once; a
redis store (gateway.stores.redis) does not cost a round trip per request: its rate limiter
spends tokens from a lease held locally — a share of the bucket reserved with one atomic script
— and tops the lease up in the background when it runs low, so a hot key costs one round trip
per lease (gateway.stores.redis_leases). Across replicas the admitted count may then exceed the
limit by at most the tokens leased and not yet spent. A store that cannot answer raises
`StoreError`; the stage decides (`on_store_error`) whether that fails open or closed.

Idempotency records need atomicity, not speed: `IdempotencyRecords.begin` is one compare-and-set
(in Redis, one Lua script: read the record, create the lock if there is none), so two replicas
can never both believe they hold the first request. The memory store bounds them (`max_keys`,
`max_bytes`): it makes room by dropping completed records, oldest first, and never a lock — a
request in flight, or one whose outcome is unknown — so when only locks are left, `begin` of a
new key raises `StoreError` rather than letting it run unprotected. A redis store bounds them by
their TTLs and Redis's `maxmemory`.
"""

from __future__ import annotations

from typing import Protocol, final

from gateway.observability.instruments import CounterChild, GaugeChild


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


@final
class StoredResponse:
    """What a duplicate is answered with: the first response, as the upstream gave it."""

    __slots__ = ("body", "headers", "pending", "replayable", "status")

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        replayable: bool = True,
        pending: bool = False,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        #: the upstream answered and its body is still streaming to the first client: the
        #: request ran, so repeats must wait (409), even past the in-flight lock's lifetime
        self.pending = pending
        #: False when the body was over max_response_bytes: the request is done (never run
        #: again for this key) but cannot be answered again
        self.replayable = replayable


#: `Begin.outcome` values
NEW = "new"  # no record: the caller holds the lock and goes upstream
IN_USE = "in_use"  # the first request is running (or its outcome is unknown): 409
REUSED = "reused"  # the key was used for a different request: 422
REPLAY = "replay"  # completed: answer with `Begin.response`
UNKNOWN = "unknown"  # the first request may have run and no answer was had: 409 for the ttl


@final
class Begin:
    __slots__ = ("outcome", "response", "retry_after")

    def __init__(
        self, outcome: str, response: StoredResponse | None = None, retry_after: float = 0.0
    ) -> None:
        self.outcome = outcome
        self.response = response
        #: for IN_USE: seconds until the lock expires at the latest
        self.retry_after = retry_after


@final
class RecordsMeter:
    """Where a store reports one stage's records: how many, their bytes, and evictions (the
    metric children of the stage's label; fresh ones that no registry renders by default)."""

    __slots__ = ("evictions", "records", "size")

    def __init__(
        self,
        records: GaugeChild | None = None,
        size: GaugeChild | None = None,
        evictions: CounterChild | None = None,
    ) -> None:
        self.records = records or GaugeChild()
        #: bytes counted against max_bytes
        self.size = size or GaugeChild()
        #: completed records dropped before their ttl to stay within the bounds
        self.evictions = evictions or CounterChild()


class IdempotencyRecords(Protocol):
    """Records of one idempotency stage, by scoped key."""

    async def begin(self, key: str, fingerprint: str, lock_ttl: float) -> Begin:
        """Atomically: the record's state, or a new in-flight lock held for `lock_ttl`;
        `StoreError` when a new lock cannot be admitted (the bounds are full of locks)."""
        ...

    async def complete(self, key: str, response: StoredResponse, ttl: float) -> None:
        """The first request ended with `response`: keep it for duplicates for `ttl` (at least
        that it ran, when its answer cannot fit)."""
        ...

    async def release(self, key: str) -> None:
        """Forget an in-flight or streaming key, so the client may try again: nothing reached an
        upstream, or the upstream de-duplicates by the key itself.  A key of unknown outcome
        or with a complete response is kept."""
        ...

    async def mark_unknown(self, key: str, fingerprint: str, ttl: float) -> None:
        """The request may have run and no complete answer came back: keep the key as unknown
        for `ttl` (a lock, never evicted), so that no repeat runs it again."""
        ...

    async def close(self) -> None: ...


class Store(Protocol):
    """What every store gives: idempotency records."""

    name: str

    def idempotency(
        self, *, namespace: str, max_keys: int, max_bytes: int, meter: RecordsMeter
    ) -> IdempotencyRecords: ...

    async def aclose(self) -> None: ...


class RateLimitStore(Store, Protocol):
    """A store that holds token buckets too (the memory store, and the redis store's leased
    buckets)."""

    def rate_limiter(
        self, *, namespace: str, rate: float, per: float, burst: int, max_keys: int
    ) -> RateLimiter: ...
