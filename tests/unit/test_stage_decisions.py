"""Stage decisions with a fake `call_next`: what the retry stage repeats, how a rate limit
behaves when its store fails (a fault the memory store cannot produce), and how idempotency
records are keyed by scope."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from gateway.core.idempotency_tokens import mint_token
from gateway.errors import (
    ConnectFailed,
    GatewayError,
    IdempotencyKeyInvalid,
    IdempotencyOutcomeUnknown,
    RateLimited,
    StoreUnavailable,
    UpstreamBusy,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.http.messages import RequestHead, Response
from gateway.observability.exposition import Registry
from gateway.observability.metrics import GatewayMetrics
from gateway.pipeline import RequestContext
from gateway.stages.idempotency import (
    IdempotencyConfig,
    IdempotencyStage,
    IdempotencyTokenConfig,
    length_prefixed,
    record_key,
)
from gateway.stages.rate_limit import RateLimitConfig, RateLimitStage
from gateway.stages.retry import RetryConfig, RetryStage
from gateway.stores.base import (
    Begin,
    IdempotencyRecords,
    RateLimiter,
    RecordsMeter,
    StoredResponse,
    StoreError,
    Verdict,
)
from gateway.stores.memory import MemoryStore
from tests.support.context import make_context, make_snapshot

CONFIG = """
listeners: [{name: http, bind: "127.0.0.1:0"}]
upstreams:
  app: {endpoints: [{url: "http://127.0.0.1:9"}]}
routes:
  - {name: app, match: {path_prefix: /}, upstream: app}
"""
FAST = RetryConfig(attempts=3, backoff_base=0.001, backoff_max=0.001)


def _ctx(method: str) -> RequestContext:
    head = RequestHead()
    head.method = method
    ctx = make_context(head, snapshot=make_snapshot(CONFIG))
    ctx.target = ctx.snapshot.upstreams["app"]
    return ctx


class Attempts:
    """A call_next that fails `failures` times, then answers 200.  Like the proxy, it counts a
    try as written (`ctx.tries.written`) unless it failed before sending (a connect error, a
    full pool)."""

    def __init__(self, failures: int, error: Exception | None = None, status: int = 0) -> None:
        self.calls = 0
        self.failures = failures
        self.error = error
        self.status = status

    async def __call__(self, ctx: RequestContext) -> Response:
        self.calls += 1
        error = self.error if self.calls <= self.failures else None
        unsent = isinstance(error, GatewayError) and error.failure in ("connect_error", "overflow")
        if not unsent:
            ctx.tries.written += 1
        if self.calls <= self.failures:
            if error is not None:
                raise error
            return Response(self.status, [])
        return Response(200, [])


def _stage(config: RetryConfig = FAST) -> RetryStage:
    return RetryStage(config, GatewayMetrics(Registry()).retries_total, asyncio.get_running_loop())


async def test_get_is_retried_until_it_succeeds() -> None:
    attempts = Attempts(2, ConnectFailed("refused"))
    response = await _stage()(_ctx("GET"), attempts)
    assert (response.status, attempts.calls) == (200, 3)


@pytest.mark.parametrize(
    ("error", "calls"),
    [
        (ConnectFailed("refused"), 2),  # never sent: safe to repeat, whatever the method
        (UpstreamBusy("pool full"), 1),  # never sent, but "overflow" is not in retry_on
        (UpstreamUnavailable("reset"), 1),  # written: a POST could run twice
        (UpstreamTimeout("slow"), 1),
    ],
    ids=["connect-error", "pool-full", "reset", "timeout"],
)
async def test_a_post_is_repeated_only_when_nothing_of_it_was_sent(
    error: GatewayError, calls: int
) -> None:
    attempts = Attempts(1, error)
    if calls == 2:
        assert (await _stage()(_ctx("POST"), attempts)).status == 200
    else:
        with pytest.raises(type(error)):
            await _stage()(_ctx("POST"), attempts)
    assert attempts.calls == calls


async def test_post_only_with_a_key_the_idempotency_stage_accepted() -> None:
    attempts = Attempts(1, status=503)
    response = await _stage()(_ctx("POST"), attempts)
    assert (response.status, attempts.calls) == (503, 1)
    keyed = _ctx("POST")
    keyed.tries.resend_keyed = True
    attempts = Attempts(1, status=503)
    response = await _stage()(keyed, attempts)
    assert (response.status, attempts.calls) == (200, 2)


async def test_failures_not_listed_are_not_retried() -> None:
    no_504 = dataclasses.replace(FAST, retry_statuses=(502, 503))
    attempts = Attempts(1, UpstreamTimeout("slow"))
    with pytest.raises(UpstreamTimeout):
        await _stage(no_504)(_ctx("GET"), attempts)
    assert attempts.calls == 1


async def test_a_timeout_counts_as_504() -> None:
    attempts = Attempts(1, UpstreamTimeout("slow"))
    response = await _stage()(_ctx("GET"), attempts)
    assert (response.status, attempts.calls) == (200, 2)


async def test_the_last_error_is_raised_when_attempts_run_out() -> None:
    attempts = Attempts(5, ConnectFailed("refused"))
    with pytest.raises(ConnectFailed):
        await _stage()(_ctx("GET"), attempts)
    assert attempts.calls == 3


async def test_budget_refuses_beyond_min_concurrent_retries() -> None:
    ctx = _ctx("GET")
    assert ctx.target is not None
    ctx.target.retrying = 3  # three other requests are retrying already, none in flight
    attempts = Attempts(1, status=503)
    response = await _stage()(ctx, attempts)
    assert (response.status, attempts.calls) == (503, 1)
    assert ctx.outcomes == {"retry": "budget_exhausted"}
    assert ctx.target.budget_exhausted.value == 1
    ctx.target.in_flight = 20  # 20 % of 20 in flight = 4 > 3: room for one more
    attempts = Attempts(1, status=503)
    assert (await _stage()(_ctx_on(ctx), attempts)).status == 200


def _ctx_on(previous: RequestContext) -> RequestContext:
    ctx = make_context(previous.head, snapshot=previous.snapshot)
    ctx.target = previous.target
    return ctx


async def test_retrying_count_returns_to_zero() -> None:
    ctx = _ctx("GET")
    await _stage()(ctx, Attempts(2, status=502))
    assert ctx.target is not None
    assert ctx.target.retrying == 0
    assert ctx.tries.deadline == ctx.deadline


class FailingStore:
    name = "broken"

    def rate_limiter(
        self, *, namespace: str, rate: float, per: float, burst: int, max_keys: int
    ) -> RateLimiter:
        return FailingLimiter()

    async def aclose(self) -> None:
        return None


class FailingLimiter:
    async def take(self, key: str) -> Verdict:
        raise StoreError("connection refused")

    def close(self) -> None:
        return None


async def _ok(ctx: RequestContext) -> Response:
    return Response(200, [])


async def test_store_error_falls_back_to_a_local_bucket_when_allowed() -> None:
    metrics = GatewayMetrics(Registry())
    config = RateLimitConfig(rate=1, per=60.0, burst=1, on_store_error="allow")
    stage = RateLimitStage(config, "limit", "route:app:0", FailingStore(), MemoryStore(), metrics)
    ctx = _ctx("GET")
    assert (await stage(ctx, _ok)).status == 200
    assert ctx.outcomes == {"rate_limit": "store_error"}
    # the local bucket of the same policy still limits
    with pytest.raises(RateLimited, match="rate limit 'limit' exceeded"):
        await stage(_ctx("GET"), _ok)
    assert metrics.rate_limit_store_errors_total.labels("app").value == 2


async def test_store_error_is_a_503_when_denied() -> None:
    metrics = GatewayMetrics(Registry())
    config = RateLimitConfig(rate=1, per=60.0, burst=1, on_store_error="deny")
    stage = RateLimitStage(config, "limit", "route:app:0", FailingStore(), MemoryStore(), metrics)
    with pytest.raises(StoreUnavailable):
        await stage(_ctx("GET"), _ok)


class FailingIdempotencyStore(FailingStore):
    def idempotency(
        self, *, namespace: str, max_keys: int, max_bytes: int, meter: RecordsMeter
    ) -> IdempotencyRecords:
        return FailingRecords()


class FailingRecords:
    async def begin(self, key: str, fingerprint: str, lock_ttl: float) -> Begin:
        raise StoreError("connection refused")

    async def complete(self, key: str, response: StoredResponse, ttl: float) -> None:
        raise StoreError("connection refused")

    async def release(self, key: str) -> None:
        raise StoreError("connection refused")

    async def mark_unknown(self, key: str, fingerprint: str, ttl: float) -> None:
        raise StoreError("connection refused")

    async def close(self) -> None:
        return None


def _keyed(method: str = "POST", **headers: str) -> RequestContext:
    ctx = _ctx(method)
    ctx.head.replace_headers(
        [(b"Idempotency-Key", b"k-1")] + [(n.encode(), v.encode()) for n, v in headers.items()]
    )
    return ctx


@pytest.mark.parametrize(("on_error", "status"), [("deny", 503), ("allow", 200)])
async def test_idempotency_store_errors(on_error: str, status: int) -> None:
    config = IdempotencyConfig(
        scope="none", on_store_error="deny" if on_error == "deny" else "allow"
    )
    metrics = GatewayMetrics(Registry())
    stage = IdempotencyStage(
        config, "app", "t", FailingIdempotencyStore(), metrics, asyncio.get_running_loop()
    )
    ctx = _keyed()
    if status == 503:
        with pytest.raises(StoreUnavailable):
            await stage(ctx, _ok)
    else:
        assert (await stage(ctx, _ok)).status == 200
        assert ctx.tries.resend_keyed is False  # not de-duplicated: a written try is never re-sent
    assert ctx.outcomes == {"idempotency": "store_error"}


async def test_signed_keys_can_be_bound_to_a_claim_or_a_certificate() -> None:
    secret = "s" * 32
    metrics = GatewayMetrics(Registry())
    loop = asyncio.get_running_loop()
    for source, setup, client in (
        ("jwt:sub", lambda c: setattr(c, "claims", {"sub": "alice"}), "alice"),
        ("mtls:san", lambda c: setattr(c.peer, "client_sans", ("spiffe://x/a",)), "spiffe://x/a"),
    ):
        token = IdempotencyTokenConfig(secret=secret, client_id=source)
        stage = IdempotencyStage(
            IdempotencyConfig(scope="none", token=token),
            "app",
            source,
            MemoryStore(),
            metrics,
            loop,
        )
        ctx = _ctx("POST")
        setup(ctx)
        ctx.head.replace_headers([(b"Idempotency-Key", mint_token(secret, client).encode())])
        assert (await stage(ctx, _ok)).status == 200
        assert ctx.tries.resend_keyed is False  # the upstream does not de-duplicate
        other = _ctx("POST")
        other.head.replace_headers(list(ctx.head.headers))  # same token, no identity: refused
        with pytest.raises(IdempotencyKeyInvalid):
            await stage(other, _ok)


def _unprefix(text: str) -> list[str]:
    """The parts `length_prefixed` joined, read back."""
    parts = []
    while text:
        length, _, rest = text.partition(":")
        parts.append(rest[: int(length)])
        text = rest[int(length) :]
    return parts


@pytest.mark.parametrize(
    "parts",
    [
        ("header:x-tenant", "a\x1fb", "", "c"),
        ("header:x-tenant", "a", "", "b\x1fc"),
        ("jwt:sub", "3:abc", "1:", "key"),
        ("jwt:sub", "", "3:abc1:", "key"),
        ("none", "", "", "12:x"),
        ("mtls:san", "8:a,b.corp", "", ":"),
    ],
    ids=[
        "separator-left",
        "separator-right",
        "prefix-like-scope",
        "prefix-like-client",
        "digits",
        "colon",
    ],
)
def test_record_keys_are_read_back_unambiguously(parts: tuple[str, str, str, str]) -> None:
    # a record key decodes to exactly its parts, so two different scopes/clients/keys never meet
    kind, scope, client, key = parts
    assert _unprefix(record_key(length_prefixed(kind), scope, client, key)) == list(parts)
    assert _unprefix(length_prefixed(*parts)) == list(parts)


async def test_a_certificate_scope_keeps_san_lists_apart() -> None:
    metrics = GatewayMetrics(Registry())
    config = IdempotencyConfig(scope="mtls:san")
    stage = IdempotencyStage(config, "app", "t", MemoryStore(), metrics, asyncio.get_running_loop())
    executed: list[tuple[str, ...] | None] = []

    async def upstream(ctx: RequestContext) -> Response:
        executed.append(ctx.peer.client_sans)
        return Response(200, [])

    # comma-joined, these two certificates would be one client
    for sans in (("spiffe://corp/a,b",), ("spiffe://corp/a", "b"), ("spiffe://corp/a,b",)):
        ctx = _keyed()
        ctx.peer.client_sans = sans
        await stage(ctx, upstream)
    assert executed == [("spiffe://corp/a,b",), ("spiffe://corp/a", "b")]
    without = _keyed()
    with pytest.raises(IdempotencyKeyInvalid, match="SANs of its client certificate"):
        await stage(without, upstream)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_an_unknown_outcome_outlives_the_lock_for_the_whole_ttl() -> None:
    """Issue 12, defect 2: after a 504 the key's lock expired at the route's timeout + 30 s and
    a repeat ran the request again; an unknown outcome stays unknown for the record's ttl."""
    clock = _Clock()
    store = MemoryStore(clock)
    config = IdempotencyConfig(scope="none", ttl=3600.0)
    metrics = GatewayMetrics(Registry())
    stage = IdempotencyStage(config, "app", "t", store, metrics, asyncio.get_running_loop())
    executions = 0

    async def written_then_timed_out(ctx: RequestContext) -> Response:
        nonlocal executions
        executions += 1
        ctx.tries.written += 1
        raise UpstreamTimeout("no answer")

    with pytest.raises(UpstreamTimeout):
        await stage(_keyed(), written_then_timed_out)
    for later in (1.0, 60.0, 3599.0):  # past the lock (the route's timeout + 30 s), within ttl
        clock.now = 1000.0 + later
        with pytest.raises(IdempotencyOutcomeUnknown):
            await stage(_keyed(), written_then_timed_out)
    assert executions == 1
    clock.now = 1000.0 + 3601.0  # the record expired: the key is a new one
    with pytest.raises(UpstreamTimeout):
        await stage(_keyed(), written_then_timed_out)
    assert executions == 2
