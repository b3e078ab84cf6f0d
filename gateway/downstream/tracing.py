"""A request's SERVER span: begun when the connection has routed the request, ended when the
request is recorded.  Only a sampled request whose spans are exported gets one; every traced
request gets its ids (for the access log, log lines and the upstream's `traceparent`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.observability.instruments import bounded_method
from gateway.observability.request_trace import RequestTrace, TraceSlot, start_trace
from gateway.observability.spans import SERVER, Attributes, SpanRecord

if TYPE_CHECKING:
    from gateway.http.messages import RequestHead
    from gateway.observability.tracing import Tracer
    from gateway.pipeline import Peer
    from gateway.runtime.snapshot import Route


def begin_request(
    tracer: Tracer, head: RequestHead, route: Route, peer: Peer, slot: TraceSlot
) -> RequestTrace:
    trace = start_trace(tracer, head.traceparent, head.tracestate, route.trace_bound, slot)
    if trace.sampled and tracer.recording:
        method = bounded_method(head.method)
        if method == "OTHER":
            method = "_OTHER"
        attributes: Attributes = [
            "http.request.method",
            method,
            "url.path",
            head.path,
            "url.scheme",
            peer.scheme,
            "http.route",
            route.trace_route,
            "network.peer.address",
            peer.ip,
            "network.protocol.version",
            head.version,
            "gateway.route",
            route.name,
        ]
        if method == "_OTHER":
            attributes.append("http.request.method_original")
            attributes.append(head.method)
        if head.host_name:
            attributes.append("server.address")
            attributes.append(head.host_name)
        parent = trace.parent
        trace.span = SpanRecord(
            trace.trace_id,
            trace.span_id,
            "" if parent is None else parent.span_id,
            parent is not None,
            "" if parent is None or parent.tracestate is None else parent.tracestate,
            SERVER,
            f"{method} {route.trace_route}",  # semantic conventions: "{method} {http.route}"
            attributes,
        )
    return trace


def end_request(trace: RequestTrace, status: int, client: str, request_id: bytes) -> None:
    """End the SERVER span, if the request has one: a 5xx is an error (a 4xx is the client's,
    not the server's)."""
    span = trace.span
    if span is None:
        return
    trace.span = None
    error = str(status) if status >= 500 else None
    span.end(
        status,
        error,
        ["client.address", client, "gateway.request_id", request_id.decode("latin-1")],
    )
    trace.finished(span)
