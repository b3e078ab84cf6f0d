"""The `rate_limit` stage (SPEC §5.3): a token bucket per key, in the configured store.

The key is built from the request by extractors chosen at build time (client_ip, route,
header:NAME, jwt:CLAIM, mtls:san, consumer, or several joined into one composite key).  A
missing header, claim or certificate is a key of its own (an empty part), shared by every
request without it, so leaving a header out is not a way around the limit.

Every response of the route carries the IETF draft's `RateLimit-Policy` and `RateLimit` headers
(gateway errors raised further in included); a refusal is a 429 `rate_limited` with
`Retry-After`.  When the store cannot answer, `on_store_error: allow` falls back to a local
bucket of the same policy (logged and counted) and `deny` answers 503 `store_unavailable`.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, final

from gateway.config.model import StageSpec
from gateway.config.reader import Fields, Reader, choice, positive_duration, positive_int
from gateway.config.stages import PipelineCheck
from gateway.errors import ConfigError, GatewayError, RateLimited, StoreUnavailable
from gateway.http.messages import Response
from gateway.identity import Part, client_ip, identity_part
from gateway.observability.instruments import Counter, CounterChild
from gateway.observability.metrics import GatewayMetrics
from gateway.pipeline import Next, RequestContext
from gateway.stages.converters import TOKEN, check_identity_key, store_name
from gateway.stages.kind import BuildContext, StageKind
from gateway.stores.base import RateLimiter, RateLimitStore, StoreError, Verdict
from gateway.stores.memory import MemoryRateLimiter, MemoryStore
from gateway.stores.redis import RedisStore
from gateway.stores.redis_leases import RedisRateLimiter

log = logging.getLogger("gateway.rate_limit")

#: what a rate limit is keyed on: one of these, or several (a composite key)
RateLimitKey = str  # client_ip | route | header:<name> | jwt:<claim> | mtls:san | consumer


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitConfig:
    """A token bucket per key: `rate` tokens every `per` seconds, holding at most `burst`."""

    rate: float
    per: float = 1.0
    #: when left out: the rate, rounded up
    burst: int
    key: tuple[RateLimitKey, ...] = ("client_ip",)
    max_keys: int = 100_000
    store: str = "memory"
    on_store_error: Literal["allow", "deny"] = "allow"


EXAMPLE: Final = """\
rate: 100
per: 1m
burst: 20
key: [client_ip, "header:X-Api-Key"]
"""


def _number(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(path, "must be a number")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(path, "must be > 0")
    return float(value)


#: rate-limit key kinds; the ones with a value after the colon are listed with it
_KEY_KINDS: Final = ("client_ip", "route", "mtls:san", "consumer", "header:NAME", "jwt:CLAIM")


def _rate_key(value: object, path: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(path, "must name at least one key")
    keys: list[str] = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if isinstance(value, list) else path
        if not isinstance(item, str):
            raise ConfigError(where, f"must be one of {', '.join(_KEY_KINDS)}")
        kind, sep, arg = item.partition(":")
        if item in ("client_ip", "route", "mtls:san", "consumer"):
            key = item
        elif kind == "header" and sep and TOKEN.match(arg):
            key = f"header:{arg.lower()}"
        elif kind == "jwt" and sep and arg:
            key = item
        else:
            hint = difflib.get_close_matches(item, _KEY_KINDS, n=1)
            raise ConfigError(
                where,
                f"unknown key kind {item!r}"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f"; keys: {', '.join(_KEY_KINDS)}",
            )
        if key in keys:
            raise ConfigError(where, f"{item} is listed twice")
        keys.append(key)
    return tuple(keys)


_FIELDS: Final = Fields(
    RateLimitConfig,
    {
        "rate": _number,
        "per": positive_duration,
        "burst": positive_int,
        "key": _rate_key,
        "max_keys": positive_int,
        "store": store_name,
        "on_store_error": choice("allow", "deny"),
    },
    required=("rate",),
)


def parse(r: Reader, raw: object, path: str) -> RateLimitConfig | None:
    m = _FIELDS.mapping(r, raw, path)
    if m is None:
        return None
    errors = len(r.errors)
    values = _FIELDS.values(r, m, path, rate=1.0)
    if values["burst"] is None:
        values["burst"] = max(1, math.ceil(values["rate"]))
    return _FIELDS.create(r, values, path, errors)


def _check(check: PipelineCheck, config: RateLimitConfig) -> RateLimitConfig:
    for key in config.key:
        check_identity_key(check, key, "rate-limit key")
    return config


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


def _limiter(store: RateLimitStore, namespace: str, config: RateLimitConfig) -> RateLimiter:
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
        "_leased",
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
        store: RateLimitStore,
        local: RateLimitStore,
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
        # a redis store's lease answers synchronously too, until it must ask Redis
        self._leased = self._limiter if isinstance(self._limiter, RedisRateLimiter) else None
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
            key = self._key(ctx)
            leased = self._leased
            answered = leased.take_now(key) if leased is not None else None
            verdict = answered if answered is not None else await self._take(ctx, key)
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


def build(config: RateLimitConfig, spec: StageSpec, env: BuildContext) -> RateLimitStage:
    store = env.stores[config.store]
    if not isinstance(store, MemoryStore | RedisStore):
        raise ValueError(f"store {config.store!r} cannot hold rate limits")
    return RateLimitStage(config, spec.label, spec.owner, store, env.memory, env.metrics)


KIND: Final[StageKind[RateLimitConfig, RateLimitStage]] = StageKind(
    name="rate_limit",
    parse=parse,
    build=build,
    example=EXAMPLE,
    check=_check,
    # a request still in a retired stage starts a fresh bucket: never refused for it
    retire=RateLimitStage.close,
    close=RateLimitStage.close,
)
