"""The `rate_limit` stage (SPEC §5.3): a token bucket per key, in the configured store.

The key is built from the request by extractors chosen at build time (client_ip, route,
header:NAME, jwt:CLAIM, mtls:san, or several joined into one composite key).  A missing header,
claim or certificate is a key of its own (an empty part), shared by every request without it,
so leaving a header out is not a way around the limit.

Every response of the route carries the IETF draft's `RateLimit-Policy` and `RateLimit` headers
(gateway errors raised further in included); a refusal is a 429 `rate_limited` with
`Retry-After`.  When the store cannot answer, `on_store_error: allow` falls back to a local
bucket of the same policy (logged and counted) and `deny` answers 503 `store_unavailable`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import final

from gateway.config.model import RateLimitConfig
from gateway.errors import GatewayError, RateLimited, StoreUnavailable
from gateway.http.messages import Response
from gateway.identity import Part, client_ip, identity_part
from gateway.observability.metrics import Counter, CounterChild, GatewayMetrics
from gateway.pipeline import Next, RequestContext
from gateway.stores.base import RateLimiter, Store, StoreError, Verdict
from gateway.stores.memory import MemoryRateLimiter

log = logging.getLogger("gateway.rate_limit")

KeyPart = Callable[[RequestContext], str]


def _route(ctx: RequestContext) -> str:
    return ctx.route.name


def _or_empty(part: Part) -> KeyPart:
    def key(ctx: RequestContext) -> str:
        return part(ctx) or ""

    return key


def key_function(kinds: Sequence[str]) -> KeyPart:
    """The function building a request's key from the configured key kinds."""
    parts: list[KeyPart] = []
    for kind in kinds:
        if kind == "route":
            parts.append(_route)
        elif kind == "client_ip":
            parts.append(client_ip)
        else:
            # a missing header, claim or certificate is a key of its own: the empty part
            parts.append(_or_empty(identity_part(kind)))
    if len(parts) == 1:
        return parts[0]

    def composite(ctx: RequestContext) -> str:
        # each part length-prefixed: a claim may hold any character, so no separator is safe
        # ("a|b" + "c" must never be the bucket of "a" + "b|c")
        return "".join([f"{len(value)}:{value}" for value in [part(ctx) for part in parts]])

    return composite


def policy_window(config: RateLimitConfig) -> tuple[int, int]:
    """(quota, window seconds) for RateLimit-Policy: whole seconds, the rate scaled to them."""
    window = max(1, round(config.per))
    return max(1, round(config.rate * window / config.per)), window


def _limiter(store: Store, namespace: str, config: RateLimitConfig) -> RateLimiter:
    return store.rate_limiter(
        namespace=namespace,
        rate=config.rate,
        per=config.per,
        burst=config.burst,
        max_keys=config.max_keys,
    )


@final
class RateLimitStage:
    __slots__ = (
        "_denied",
        "_deny_on_error",
        "_fallback",
        "_key",
        "_limited",
        "_limiter",
        "_local",
        "_name",
        "_name_bytes",
        "_policy",
        "_store_errors",
    )

    def __init__(
        self,
        config: RateLimitConfig,
        name: str,
        namespace: str,
        store: Store,
        local: Store,
        metrics: GatewayMetrics,
    ) -> None:
        self._name = name
        self._name_bytes = name.encode("latin-1")
        self._key = key_function(config.key)
        quota, window = policy_window(config)
        self._policy = f'"{name}";q={quota};w={window}'.encode("latin-1")
        self._limiter = _limiter(store, namespace, config)
        # the memory store answers synchronously: no coroutine per request for it
        self._local = self._limiter if isinstance(self._limiter, MemoryRateLimiter) else None
        # where a failing shared store's requests are counted instead (on_store_error: allow)
        self._fallback = (
            _limiter(local, namespace, config)
            if store is not local and config.on_store_error == "allow"
            else None
        )
        self._deny_on_error = config.on_store_error == "deny"
        self._limited: Counter = metrics.rate_limited_total
        self._store_errors: Counter = metrics.rate_limit_store_errors_total
        self._denied: dict[str, CounterChild] = {}

    async def _take(self, ctx: RequestContext, key: str) -> Verdict:
        try:
            return await self._limiter.take(key)
        except StoreError as exc:
            self._store_errors.labels(ctx.route.name).inc()
            log.warning("rate-limit store failed: %s", exc, extra={"stage": self._name})
            if self._deny_on_error or self._fallback is None:
                raise StoreUnavailable("the rate-limit store is unavailable") from exc
            ctx.outcome("rate_limit", "store_error")
            return await self._fallback.take(key)

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Response:
        local = self._local
        if local is not None:
            verdict = local.take_now(self._key(ctx))
        else:
            verdict = await self._take(ctx, self._key(ctx))
        state = b'"%b";r=%d;t=%d' % (
            self._name_bytes,
            verdict.remaining,
            math.ceil(verdict.reset_after),
        )
        if not verdict.allowed:
            route = ctx.route.name
            child = self._denied.get(route)
            if child is None:
                child = self._denied[route] = self._limited.labels(route)
            child.inc()
            ctx.outcome("rate_limit", "limited")
            raise RateLimited(
                f"rate limit {self._name!r} exceeded",
                headers=(
                    ("Retry-After", str(max(1, math.ceil(verdict.retry_after)))),
                    ("RateLimit-Policy", self._policy.decode("latin-1")),
                    ("RateLimit", state.decode("latin-1")),
                ),
            )
        try:
            response = await call_next(ctx)
        except GatewayError as exc:
            exc.headers = (
                *exc.headers,
                ("RateLimit-Policy", self._policy.decode("latin-1")),
                ("RateLimit", state.decode("latin-1")),
            )
            raise
        headers = response.headers
        headers.append((b"RateLimit-Policy", self._policy))
        headers.append((b"RateLimit", state))
        return response

    def close(self) -> None:
        self._limiter.close()
        if self._fallback is not None:
            self._fallback.close()
