"""What every connection of one listener shares: the app's current snapshot, metrics children
resolved for this listener, request ids, and the one place a finished request is recorded."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol, final

from gateway.core.waiter import ReadySteps
from gateway.downstream.tracing import end_request
from gateway.observability.access_log import AccessEntry, loggable_path
from gateway.observability.instruments import CounterChild, bounded_method, clock
from gateway.observability.metrics import GatewayMetrics

if TYPE_CHECKING:
    from gateway.downstream.connection import Exchange, HttpConnection
    from gateway.pipeline import RequestContext
    from gateway.runtime.snapshot import Route, Snapshot


#: "000" to "999": the last three digits of a request id
_THREE_DIGITS: Final = [b"%03d" % n for n in range(1000)]


@final
class RequestIds:
    """X-Request-Id values for the requests that bring none: unique per process (a random
    prefix) and cheap — a counter, not a uuid.

    The counter is written as a thousands part, formatted once every 1000 ids, and the last
    three digits from a table: one concatenation per request instead of formatting the number
    (~520 instructions, callgrind, against ~205).  The first thousand are "<prefix>-000" to
    "<prefix>-999", then "<prefix>-1000" on: the number of ids given out before, every one
    different."""

    __slots__ = ("_head", "_low", "_prefix", "_thousands")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex().encode("ascii") + b"-"
        self._thousands = 0
        self._head = self._prefix
        self._low = -1

    def new(self) -> bytes:
        low = self._low + 1
        if low == 1000:
            low = 0
            self._thousands += 1
            self._head = b"%b%d" % (self._prefix, self._thousands)
        self._low = low
        return self._head + _THREE_DIGITS[low]


class ServingApp(Protocol):
    """The parts of the application the data plane reads."""

    snapshot: Snapshot
    draining: bool
    connections: set[HttpConnection]
    #: open connections per client address (untrusted peers only), for max_connections_per_client
    client_connections: dict[str, int]
    metrics: GatewayMetrics

    def on_connection_closed(self) -> None: ...


@final
class ServerState:
    __slots__ = (
        "_unrouted",
        "_unrouted_bytes_in",
        "_unrouted_bytes_out",
        "app",
        "client_connections",
        "connections",
        "connections_gauge",
        "draining",
        "https_redirect",
        "in_flight_gauge",
        "listener",
        "loop",
        "loop_time",
        "ready",
        "refused_full",
        "refused_per_client",
        "refusing",
        "request_ids",
        "scheme",
        "slow_downloads",
        "slow_uploads",
        "snapshot",
        "tls",
    )

    def __init__(
        self, app: ServingApp, loop: asyncio.AbstractEventLoop, listener: str, scheme: str
    ) -> None:
        #: the listener terminates TLS (its connections may carry a client certificate)
        self.tls = scheme == "https"
        self.app = app
        # copies of the app's values, read several times per request as plain attributes:
        #: mirrors Gateway.snapshot; written only by Gateway._install (a reload swaps both)
        self.snapshot: Snapshot = app.snapshot
        #: mirrors Gateway.draining; written only by Gateway._stop_accepting (drain sets both)
        self.draining = app.draining
        #: mirrors snapshot.https_redirects[listener] (None: the listener routes as usual);
        #: written with `snapshot`, by Gateway._install
        self.https_redirect: Route | None = app.snapshot.https_redirects.get(listener)
        self.connections = app.connections
        self.client_connections = app.client_connections
        self.loop = loop
        #: `loop.time`, bound once: called as an attribute of a Python object, each call would
        #: look the method up first (~100 instructions, callgrind; a request reads the clock
        #: several times)
        self.loop_time: Callable[[], float] = loop.time
        #: the listener's driven requests woken this turn, resumed together (core.waiter)
        self.ready = ReadySteps(loop)
        self.listener = listener
        self.scheme = scheme
        self.connections_gauge = app.metrics.connections_active.labels(listener)
        self.in_flight_gauge = app.metrics.requests_in_flight
        refused = app.metrics.connections_refused_total
        self.refused_full = refused.labels(listener, "max_connections")
        self.refused_per_client = refused.labels(listener, "per_client")
        #: refused connections waiting to send their request and read the 503 (connection.py)
        self.refusing = 0
        slow = app.metrics.slow_clients_total
        self.slow_uploads = slow.labels(listener, "upload")
        self.slow_downloads = slow.labels(listener, "download")
        self.request_ids = RequestIds()
        self._unrouted: dict[tuple[str, int], CounterChild] = {}
        # requests that match no route count with route="", as in gateway_requests_total
        self._unrouted_bytes_in = app.metrics.request_bytes_total.labels("")
        self._unrouted_bytes_out = app.metrics.response_bytes_total.labels("")

    def on_connection_closed(self) -> None:
        self.app.on_connection_closed()

    def new_request_id(self) -> bytes:
        return self.request_ids.new()

    def record(
        self,
        exchange: Exchange,
        ctx: RequestContext | None,
        status: int,
        request_id: bytes,
        bytes_out: int,
        client: str,
        peer: str,
    ) -> None:
        """Metrics and the access log of one finished request — the only place they are emitted."""
        elapsed = clock() - exchange.measured_from
        head = exchange.head
        method = bounded_method(head.method)
        body = exchange.body
        bytes_in = body.received if body is not None else 0
        route = exchange.route
        if route is not None:
            route.requests_child(method, status).inc()
            route.duration.observe(elapsed)
            route.request_bytes.inc(bytes_in)
            route.response_bytes.inc(bytes_out)
        else:
            child = self._unrouted.get((method, status))
            if child is None:
                child = self.app.metrics.requests_total.labels("", method, str(status))
                self._unrouted[(method, status)] = child
            child.inc()
            self._unrouted_bytes_in.inc(bytes_in)
            self._unrouted_bytes_out.inc(bytes_out)
        trace = ctx.trace if ctx is not None else None
        if trace is not None:
            # a request whose spans are exported (a trace the collector will have) becomes its
            # duration bucket's exemplar.  Here rather than at `observe` above, so an untraced
            # request pays nothing and an unsampled one this one test; read before end_request,
            # which lets go of the span
            span = trace.span
            if span is not None:
                if route is not None:
                    route.duration.exemplar(elapsed, span.trace_id, span.span_id)
                end_request(trace, status, client, request_id)
        access_log = exchange.snapshot.access_log
        if not access_log.wants(status):
            return
        access_log.emit(
            AccessEntry(
                time=time.time() - elapsed,
                request_id=request_id.decode("latin-1"),
                trace_id=trace.trace_id if trace is not None else None,
                span_id=trace.span_id if trace is not None else None,
                route=route.name if route is not None else None,
                method=head.method,
                path=loggable_path(head.path),
                status=status,
                duration_ms=round(elapsed * 1000, 3),
                upstream=ctx.upstream if ctx is not None else None,
                endpoint=ctx.endpoint if ctx is not None else None,
                attempts=ctx.attempts if ctx is not None else 0,
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                client=client,
                peer=peer,
                stages=(ctx.outcomes or {}) if ctx is not None else {},
            )
        )

