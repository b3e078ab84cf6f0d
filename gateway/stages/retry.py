"""The `retry` stage (SPEC §5.6): try the rest of the pipeline again when an attempt fails.

What may be retried, and when (SPEC §5.6):
- a try that was never written to an upstream (a connect error, a pool that stayed full): for
  any method, and whatever its body — nothing of it was sent or consumed;
- a try that was written (`ctx.tries.written` grew: any byte may have reached the upstream):
  only when repeating it is harmless — an idempotent method, or a POST or PATCH whose key an
  earlier `idempotency` stage accepted for an upstream that de-duplicates by it
  (`ctx.tries.resend_keyed`) — and only when its body can be sent again: none, or one of at most
  64 KiB, buffered before the first try;
- only failures named in `retry_on` (connect_error, reset, timeout, statuses); a timeout is the
  gateway's own 504, so `504` in `retry_on` (the default) retries it too, as in Envoy, where a
  per-try timeout counts as a gateway error;
- only while the upstream's retry budget allows: retries in flight at most `budget_ratio` of the
  upstream's requests in flight, or `budget_min_concurrent`, whichever is more — so a failing
  upstream sees at most that many extra requests instead of `attempts` times its load;
- only within the route's timeout: each try gets `per_try_timeout` (or what is left), and a
  backoff that would run past the deadline is not slept.
Each retry avoids the endpoint that just failed when there is another one.  Backoff is "full
jitter": uniform in [0, min(max, base * 2^(n-1))].
"""

from __future__ import annotations

import asyncio
import difflib
import random
from dataclasses import dataclass
from typing import Final, final

from gateway.config.model import StageSpec
from gateway.config.reader import Fields, Reader, positive_duration, positive_int, status
from gateway.errors import ConfigError, GatewayError
from gateway.http.messages import Response
from gateway.observability.instruments import Counter, CounterChild
from gateway.pipeline import Next, RequestContext
from gateway.stages.converters import non_negative_int, share
from gateway.stages.kind import BuildContext, StageKind
from gateway.stages.proxy import discard
from gateway.upstream.upstream import Upstream

#: failures a retry may follow, besides response statuses
RETRY_FAILURES = ("connect_error", "reset", "timeout")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryConfig:
    #: total tries, the first included
    attempts: int = 2
    #: None = each try may use what is left of the route's timeout
    per_try_timeout: float | None = None
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    #: failure kinds of RETRY_FAILURES
    retry_on: tuple[str, ...] = ("connect_error", "reset")
    retry_statuses: tuple[int, ...] = (502, 503, 504)
    #: retries in flight per upstream may be at most this share of its requests in flight …
    budget_ratio: float = 0.2
    #: … or this many, whichever is more
    budget_min_concurrent: int = 3


EXAMPLE: Final = """\
attempts: 3
per_try_timeout: 2s
backoff: {base: 25ms, max: 250ms}
retry_on: [connect_error, reset, 503]
budget: {ratio: 0.2, min_concurrent: 3}
"""


def _attempts(value: object, path: str) -> int:
    result = positive_int(value, path)
    if result > 10:
        raise ConfigError(path, "must be at most 10")
    return result


def _retry_on(value: object, path: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "must be a non-empty list of failures and statuses")
    kinds: list[str] = []
    codes: list[int] = []
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if isinstance(item, str) and item in RETRY_FAILURES:
            kinds.append(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            code = status(item, where)
            if code < 400:
                raise ConfigError(where, "only error statuses (400-599) can be retried")
            codes.append(code)
        else:
            hint = difflib.get_close_matches(str(item), RETRY_FAILURES, n=1)
            raise ConfigError(
                where,
                f"unknown failure {item!r}"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f"; use {', '.join(RETRY_FAILURES)} or a status such as 503",
            )
    return tuple(dict.fromkeys(kinds)), tuple(dict.fromkeys(codes))


#: the YAML groups some fields: `backoff: {base, max}`, `budget: {ratio, min_concurrent}`,
#: and `retry_on` lists failure kinds and statuses together
_FIELDS: Final = Fields(
    RetryConfig,
    {"attempts": _attempts, "per_try_timeout": positive_duration},
    extra=("backoff", "retry_on", "budget"),
)


def parse(r: Reader, raw: object, path: str) -> RetryConfig | None:
    m = _FIELDS.mapping(r, raw, path)
    if m is None:
        return None
    errors = len(r.errors)
    values = _FIELDS.values(r, m, path)
    d = RetryConfig()
    base, cap = d.backoff_base, d.backoff_max
    if m.get("backoff") is not None:
        where = f"{path}.backoff"
        b = r.mapping(m["backoff"], where, {"base", "max"})
        if b is not None:
            base = r.get(b, "base", where, positive_duration, base)
            cap = r.get(b, "max", where, positive_duration, max(cap, base))
            if cap < base:
                r.error(f"{where}.max", "must be at least base")
    kinds, codes = r.get(m, "retry_on", path, _retry_on, (d.retry_on, d.retry_statuses))
    ratio, minimum = d.budget_ratio, d.budget_min_concurrent
    if m.get("budget") is not None:
        where = f"{path}.budget"
        b = r.mapping(m["budget"], where, {"ratio", "min_concurrent"})
        if b is not None:
            ratio = r.get(b, "ratio", where, share, ratio)
            minimum = r.get(b, "min_concurrent", where, non_negative_int, minimum)
    values.update(
        backoff_base=base,
        backoff_max=cap,
        retry_on=kinds,
        retry_statuses=codes,
        budget_ratio=ratio,
        budget_min_concurrent=minimum,
    )
    return _FIELDS.create(r, values, path, errors)


#: bodies up to this size are buffered so that they can be sent again
REPLAY_LIMIT: Final = 64 * 1024
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_KEYED: Final = frozenset({"POST", "PATCH"})


@final
class RetryStage:
    __slots__ = ("_config", "_counters", "_failures", "_loop", "_retries", "_statuses")

    def __init__(
        self, config: RetryConfig, retries: Counter, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._config = config
        self._statuses = frozenset(config.retry_statuses)
        failures = set(config.retry_on)
        if 504 in self._statuses:
            failures.add("timeout")  # the gateway answers a timeout with 504
        self._failures = frozenset(failures)
        self._retries = retries
        self._counters: dict[tuple[str, str, str], CounterChild] = {}
        self._loop = loop

    def _counter(self, route: str, upstream: str, reason: str) -> CounterChild:
        """The gateway_retries_total child, resolved at a route's first retry for that reason:
        a named stage may serve several routes and upstreams, so they are not known when it is
        built (and a retry is never the common path)."""
        key = (route, upstream, reason)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = self._retries.labels(route, upstream, reason)
        return child

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Response:
        config = self._config
        if config.attempts < 2:
            return await call_next(ctx)
        method = ctx.head.method
        shared = ctx.tries
        # whether a try that was written may be sent again (one that was not always may)
        resend = method in _IDEMPOTENT or (method in _KEYED and shared.resend_keyed)
        body = ctx.body
        if body is not None and resend:
            length = ctx.head.content_length
            if (length is not None and length > REPLAY_LIMIT) or not await body.fill(REPLAY_LIMIT):
                resend = False  # streamed once: consumed by a written try
                ctx.outcome("retry", "body_too_large")
        loop = self._loop
        per_try = config.per_try_timeout
        tries = 0
        retrying: Upstream | None = None
        try:
            while True:
                tries += 1
                if per_try is not None:
                    shared.deadline = min(ctx.deadline, loop.time() + per_try)
                failure: GatewayError | None = None
                response: Response | None = None
                writes = shared.written
                try:
                    response = await call_next(ctx)
                except GatewayError as exc:
                    if exc.failure not in self._failures:
                        raise
                    failure = exc
                else:
                    if response.status not in self._statuses:
                        return response
                if shared.written > writes and not resend:
                    # it reached the upstream (an answer came, or bytes went): repeating could
                    # run it twice
                    ctx.outcome("retry", "written")
                    return _give_up(failure, response)
                # a retryable failure: is there a try, time and budget left for another?
                upstream = ctx.target
                if tries >= config.attempts or upstream is None:
                    return _give_up(failure, response)
                delay = _backoff(config, tries)
                if loop.time() + delay >= ctx.deadline:
                    return _give_up(failure, response)
                if retrying is None:
                    # counted from the first retry's backoff to the end of the request
                    if not upstream.start_retrying(
                        config.budget_ratio, config.budget_min_concurrent
                    ):
                        ctx.outcome("retry", "budget_exhausted")
                        return _give_up(failure, response)
                    retrying = upstream
                if response is not None:
                    discard(response)
                # the kind matched in retry_on (bounded: RETRY_FAILURES), or a retried status
                reason = failure.failure if failure is not None else "status"
                self._counter(ctx.route.name, upstream.name, reason).inc()
                ctx.outcome("retry", f"retried:{tries}")
                await asyncio.sleep(delay)
        finally:
            shared.deadline = ctx.deadline
            if retrying is not None:
                retrying.stop_retrying()


def _backoff(config: RetryConfig, tries: int) -> float:
    ceiling = min(config.backoff_max, config.backoff_base * (2 ** (tries - 1)))
    return random.uniform(0.0, ceiling)


def _give_up(failure: GatewayError | None, response: Response | None) -> Response:
    """The last attempt's answer: its response, or its error raised."""
    if failure is not None:
        raise failure
    assert response is not None
    return response


def build(config: RetryConfig, spec: StageSpec, env: BuildContext) -> RetryStage:
    return RetryStage(config, env.metrics.retries_total, env.loop)


KIND: Final[StageKind[RetryConfig, RetryStage]] = StageKind(
    name="retry", parse=parse, build=build, example=EXAMPLE
)
