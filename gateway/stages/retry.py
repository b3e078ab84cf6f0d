"""The `retry` stage (SPEC §5.6): try the rest of the pipeline again when an attempt fails.

What may be retried, and when (SPEC §5.6):
- a try that was never written to an upstream (a connect error, a pool that stayed full): for
  any method, and whatever its body — nothing of it was sent or consumed;
- a try that was written (`ctx.upstream_writes` grew: any byte may have reached the upstream):
  only when repeating it is harmless — an idempotent method, or a POST or PATCH whose key an
  earlier `idempotency` stage accepted for an upstream that de-duplicates by it
  (`ctx.resend_keyed`) — and only when its body can be sent again: none, or one of at most
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
import random
from typing import Final, final

from gateway.config.model import RetryConfig
from gateway.errors import GatewayError
from gateway.http.messages import Response
from gateway.observability.metrics import Counter, CounterChild
from gateway.pipeline import Next, RequestContext
from gateway.stages.proxy import discard
from gateway.upstream.upstream import Upstream

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
        self._counters: dict[tuple[str, str], CounterChild] = {}
        self._loop = loop

    def _counter(self, route: str, upstream: str) -> CounterChild:
        key = (route, upstream)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = self._retries.labels(route, upstream)
        return child

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Response:
        config = self._config
        if config.attempts < 2:
            return await call_next(ctx)
        method = ctx.head.method
        # whether a try that was written may be sent again (one that was not always may)
        resend = method in _IDEMPOTENT or (method in _KEYED and ctx.resend_keyed)
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
                    ctx.try_deadline = min(ctx.deadline, loop.time() + per_try)
                failure: GatewayError | None = None
                response: Response | None = None
                writes = ctx.upstream_writes
                try:
                    response = await call_next(ctx)
                except GatewayError as exc:
                    if exc.failure not in self._failures:
                        raise
                    failure = exc
                else:
                    if response.status not in self._statuses:
                        return response
                if ctx.upstream_writes > writes and not resend:
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
                self._counter(ctx.route.name, upstream.name).inc()
                ctx.outcome("retry", f"retried:{tries}")
                await asyncio.sleep(delay)
        finally:
            ctx.try_deadline = ctx.deadline
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
