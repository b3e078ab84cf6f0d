"""The terminal stage: send the request to an upstream endpoint and return its response.

A request body up to the route's `request_buffering` is read whole before a pooled connection is
taken, and a larger one until that much has arrived: a client that trickles its body holds its
own connection, never an upstream one (nginx's request buffering).  While every pooled
connection is busy a request waits at most `pool.queue_timeout`, then gets 503 `upstream_busy`.

The response comes back with its head read and its body still on the upstream connection (or,
when it has already arrived whole, as bytes with the connection back in its pool), so outer
stages can still change headers before the server protocol writes anything.

A kept-alive connection the upstream closed just as it was reused (no response byte received)
is retried once on a fresh connection for requests that are safe to repeat — the race every
keep-alive client meets, not a retry policy.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, final

from gateway.errors import GatewayError, UpstreamTimeout, UpstreamUnavailable
from gateway.http.forwarding import (
    build_request_head,
    rewritten_target,
    upstream_target,
    with_host,
)
from gateway.http.messages import Completion, Response
from gateway.identity import client_ip
from gateway.observability.instruments import clock
from gateway.observability.request_trace import RequestTrace, end_try
from gateway.pipeline import RequestContext
from gateway.upstream.connection import StaleConnection
from gateway.upstream.upstream import Endpoint, Upstream

if TYPE_CHECKING:
    from gateway.observability.spans import SpanRecord

_REPLAYABLE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
#: statuses that count as a failure of the endpoint for outlier detection
_OUTLIER_STATUSES: Final = frozenset({502, 503, 504})


@final
class ProxyHandler:
    __slots__ = (
        "_cumulative",
        "_single",
        "_time",
        "_total",
        "_upstreams",
        "request_buffering",
        "strip_prefix",
        "websocket",
    )

    def __init__(
        self,
        upstreams: Sequence[tuple[Upstream, int]],
        *,
        strip_prefix: str | None,
        websocket: bool,
        loop: asyncio.AbstractEventLoop,
        request_buffering: int = 0,
    ) -> None:
        live = [(u, w) for u, w in upstreams if w > 0]
        self._upstreams = [u for u, _ in live]
        self._single = self._upstreams[0] if len(live) == 1 else None
        total = 0
        self._cumulative: list[int] = []
        for _, w in live:
            total += w
            self._cumulative.append(total)
        self._total = total
        self.strip_prefix = strip_prefix
        self.websocket = websocket
        self.request_buffering = request_buffering
        #: `loop.time`, bound once (a method looked up per call costs ~100 instructions)
        self._time: Callable[[], float] = loop.time

    def draw(self) -> Upstream:
        """A weighted draw among the route's upstreams; the route makes it once per request
        (`RequestContext.target`), so retries and a circuit breaker see the same one."""
        single = self._single
        if single is not None:
            return single
        r = random.randrange(self._total)
        for candidate, bound in zip(self._upstreams, self._cumulative, strict=True):
            if r < bound:
                return candidate
        return self._upstreams[-1]

    async def __call__(self, ctx: RequestContext) -> Response:
        upstream = ctx.target
        assert upstream is not None  # a proxied route always draws one
        ctx.upstream = upstream.name
        head = ctx.head
        body = ctx.body
        # the server protocol decided (head.upgrade is set only for a tunnel on a websocket route)
        upgrade = self.websocket and head.upgrade is not None
        if body is not None:
            if not body.eof and self.request_buffering:
                # before any upstream connection is taken: the whole body, or the first part of
                # a larger one (a slow client waits on its own, and the minimum rate cuts it)
                await body.fill(self.request_buffering)
            # a body that already failed (too large, cut off) never opens an upstream exchange
            body.check()
        if body is not None and body.is_complete:
            content_length: int | None = body.received
            chunked = False
        elif body is not None:
            content_length = head.content_length
            chunked = content_length is None
        else:
            content_length = None
            chunked = False
        request = ctx.upstream_head
        # a rewrite stage's Host and path; None on most routes (the one test they pay)
        rewrite = ctx.rewrite
        endpoint_host = rewrite is not None and rewrite.endpoint_host
        if request is None:
            peer = ctx.peer
            host: bytes | None = None
            if rewrite is None:
                target = upstream_target(head, self.strip_prefix)
            else:
                path = rewrite.path
                if path is None:
                    target = upstream_target(head, self.strip_prefix)
                else:
                    target = rewritten_target(head, path)
                # b"": no Host in the shared head, each try adds its endpoint's (below)
                host = b"" if endpoint_host else rewrite.host
            request = build_request_head(
                head,
                target,
                client=peer.ip_bytes,
                trusted_peer=peer.trusted,
                scheme=peer.scheme_bytes,
                request_id=ctx.request_id,
                content_length=content_length,
                chunked=chunked,
                upgrade=upgrade,
                default_host=upstream.default_host,
                extra=ctx.upstream_headers,
                forward_underscores=ctx.route.forward_underscores,
                trace_lines=b"" if ctx.trace is None else ctx.trace.first_try_lines(),
                upstream_host=host,
            )
            ctx.upstream_head = request
        time_now = self._time
        # loop time for the deadlines, instruments.clock for the reported duration
        now = time_now()
        started = clock()
        replayable = head.method in _REPLAYABLE_METHODS and (body is None or body.is_complete)
        tries = ctx.tries
        deadline = tries.deadline
        trace = ctx.trace
        try_span: SpanRecord | None = None
        upstream.sending()
        try:
            while True:
                remaining = deadline - now
                if remaining <= 0:
                    raise UpstreamTimeout(
                        "the route's timeout expired"
                        if deadline >= ctx.deadline
                        else "the try's timeout expired"
                    )
                endpoint = upstream.pick(tries.last_endpoint)
                ctx.endpoint = endpoint.address
                ctx.attempts += 1
                tried = request
                if endpoint_host:
                    # known only now that the balancer picked it (a retry's may differ)
                    tried = with_host(request, endpoint.authority)
                if trace is None:
                    sent = tried
                else:
                    # each try carries its own traceparent: its CLIENT span is the parent
                    sent = trace.try_head(tried)
                    if trace.span is not None:
                        try_span = trace.client_span(
                            head.method,
                            upstream.name,
                            endpoint.host,
                            endpoint.port,
                            ctx.attempts - 1,
                        )
                pool = endpoint.pool
                conn = pool.take_idle()
                try:
                    if conn is None:
                        conn = await pool.acquire(
                            min(upstream.connect_timeout, remaining),
                            min(upstream.queue_timeout, remaining),
                            client_ip(ctx),
                        )
                        now = time_now()
                    endpoint.in_flight += 1
                    # from here any byte of the request may reach the upstream (SPEC §5.5-5.6)
                    tries.written += 1
                    try:
                        response = await conn.send(
                            sent,
                            body,
                            chunked,
                            head.method == "HEAD",
                            min(upstream.response_header_timeout, deadline - now),
                            ctx.snapshot.body_timeout,
                        )
                    finally:
                        endpoint.in_flight -= 1
                except GatewayError as exc:
                    if conn is not None:
                        conn.abort()
                    if trace is not None and try_span is not None:
                        end_try(trace, try_span, 0, exc.failure or type(exc).__name__)
                        try_span = None
                    if isinstance(exc, StaleConnection) and replayable and ctx.attempts < 2:
                        now = time_now()
                        continue
                    if exc.failure == "overflow":
                        upstream.busy.inc()  # local congestion: not the endpoint's failure
                    elif exc.failure:
                        upstream.record(endpoint, True)
                    tries.last_endpoint = endpoint
                    raise
                except BaseException:
                    if conn is not None:
                        conn.abort()
                    if trace is not None and try_span is not None:
                        end_try(trace, try_span, 0, "cancelled")
                    raise
                break
        finally:
            upstream.sent()
        upstream.request_duration.observe(clock() - started)
        upstream.responses[response.status // 100 - 1].inc()
        tries.last_endpoint = endpoint
        failed = response.status in _OUTLIER_STATUSES
        if response.status == 101:
            upstream.record(endpoint, failed)
            if not upgrade:
                conn.abort()
                raise UpstreamUnavailable("upstream switched protocols without being asked to")
            response.tunnel = conn
            if trace is not None and try_span is not None:
                end_try(trace, try_span, 101, None)
            return response
        complete = conn.take_complete_body()
        if complete is not None:
            upstream.record(endpoint, failed)
            if trace is not None and try_span is not None:
                end_try(trace, try_span, response.status, None)
            response.body = complete
            response.stream = None
            return response
        # the body is still to come: the exchange is judged when it ends (a body cut short is a
        # failure), by outlier detection here and by outer stages through the same completion
        completion = Completion()
        completion.add(_EndpointOutcome(upstream, endpoint, failed, ctx))
        if trace is not None and try_span is not None:
            completion.add(_TrySpanEnd(trace, try_span, response.status))
        conn.completion = completion
        response.completion = completion
        return response


@final
class _EndpointOutcome:
    """Records a streamed exchange with outlier detection once its body has ended."""

    __slots__ = ("ctx", "endpoint", "failed", "upstream")

    def __init__(
        self, upstream: Upstream, endpoint: Endpoint, failed: bool, ctx: RequestContext
    ) -> None:
        self.upstream = upstream
        self.endpoint = endpoint
        self.failed = failed
        self.ctx = ctx

    def __call__(self, outcome: bool | None) -> None:
        if outcome is None:
            return  # abandoned by the client: nothing learned about the endpoint
        if not outcome:
            self.ctx.outcome("upstream", "body_cut")
        self.upstream.record(self.endpoint, self.failed or not outcome)


@final
class _TrySpanEnd:
    """Ends a streamed try's CLIENT span when its body has ended."""

    __slots__ = ("span", "status", "trace")

    def __init__(self, trace: RequestTrace, span: SpanRecord, status: int) -> None:
        self.trace = trace
        self.span = span
        self.status = status

    def __call__(self, outcome: bool | None) -> None:
        # a body cut short is the try's failure; one the client abandoned is nobody's
        end_try(self.trace, self.span, self.status, "body_cut" if outcome is False else None)


def discard(response: Response) -> None:
    """Drop a response nobody will read (a retry replaces it): free its upstream connection."""
    stream = response.stream
    if stream is not None:
        response.stream = None
        stream.abort()
