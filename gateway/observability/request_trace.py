"""One request's place in a trace: its ids, whether it is sampled, the `traceparent` each
upstream try carries, and — for a sampled request whose spans are exported — its span records.

Compiled with the hot path: an unsampled request pays for two random ids, one header line per
try and nothing else (no span is made for it).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Final, final

from gateway.core.trace_context import (
    ParentContext,
    new_span_id,
    new_trace_id,
    read_parent,
    sampled_by_ratio,
)
from gateway.observability.spans import CLIENT, AttributeValue, SpanRecord

if TYPE_CHECKING:
    from gateway.observability.tracing import Tracer

_SAMPLED_SUFFIX: Final = "-01\r\n"
_UNSAMPLED_SUFFIX: Final = "-00\r\n"


@final
class RequestTrace:
    """Written by the downstream connection when the request starts (`start_trace`); the proxy
    asks it for each try's headers and span (`begin_try`); stages add span events through
    `RequestContext.outcome`."""

    __slots__ = ("_suffix", "parent", "sampled", "span", "span_id", "trace_id", "tracer")

    def __init__(
        self,
        tracer: Tracer,
        trace_id: str,
        span_id: str,
        sampled: bool,
        parent: ParentContext | None,
    ) -> None:
        self.tracer = tracer
        self.trace_id = trace_id
        #: the SERVER span's id (made for unsampled requests too: the access log names it)
        self.span_id = span_id
        self.sampled = sampled
        self.parent = parent
        #: the SERVER span, for a sampled request whose spans are exported
        self.span: SpanRecord | None = None
        state = parent.tracestate if parent is not None else None
        suffix = _SAMPLED_SUFFIX if sampled else _UNSAMPLED_SUFFIX
        # tracestate goes on unchanged with every try (bounded when it was read)
        self._suffix = suffix if state is None else f"{suffix}tracestate: {state}\r\n"

    def try_headers(self, span_id: str) -> bytes:
        """The trace header lines of one upstream try whose CLIENT span is `span_id`."""
        return f"traceparent: 00-{self.trace_id}-{span_id}{self._suffix}".encode("latin-1")

    def begin_try(
        self, method: str, upstream: str, host: str, port: int, resends: int
    ) -> tuple[bytes, SpanRecord | None]:
        """A new upstream try: its trace header lines, and its CLIENT span when this request's
        spans are recorded (attributes per the HTTP client semantic conventions)."""
        span_id = new_span_id()
        server = self.span
        if server is None:
            return self.try_headers(span_id), None
        attributes: list[tuple[str, AttributeValue]] = [
            ("http.request.method", method),
            ("server.address", host),
            ("server.port", port),
            ("network.peer.address", host),
            ("network.peer.port", port),
            ("gateway.upstream", upstream),
        ]
        if resends:
            attributes.append(("http.request.resend_count", resends))
        span = SpanRecord(
            self.trace_id,
            span_id,
            server.span_id,
            False,
            server.trace_state,
            CLIENT,
            method,
            attributes,
        )
        return self.try_headers(span_id), span

    def event(self, stage: str, decision: str) -> None:
        """A stage's decision, as the event `gateway.<stage>` on the SERVER span (sampled,
        recorded requests; nothing is built for the others)."""
        span = self.span
        if span is not None:
            span.add_event(f"gateway.{stage}", [("gateway.decision", decision)])


def start_trace(
    tracer: Tracer, traceparent: bytes | None, tracestate: bytes | None, bound: str
) -> RequestTrace:
    """Continue the trace a valid `traceparent` names (its sampled flag decides), or start a new
    one sampled by `bound`.  `traceparent` is b"" when the request carried several."""
    parent = None
    if traceparent:
        state = [tracestate.decode("latin-1")] if tracestate else []
        parent = read_parent([traceparent.decode("latin-1")], state)
    if parent is None:
        trace_id = new_trace_id()
        sampled = sampled_by_ratio(trace_id, bound)
    else:
        trace_id = parent.trace_id
        sampled = parent.sampled
    return RequestTrace(tracer, trace_id, new_span_id(), sampled, parent)


#: the trace of the request being handled, for log lines written meanwhile (set by the
#: downstream connection around each traced request)
CURRENT_TRACE: Final[ContextVar[RequestTrace | None]] = ContextVar("gateway_trace", default=None)


def end_try(trace: RequestTrace, span: SpanRecord, status: int, error_type: str | None) -> None:
    """End a try's CLIENT span: a failure (`error_type`) or a status of 400 and up is an error
    (semantic conventions, client side)."""
    if error_type is None and status >= 400:
        error_type = str(status)
    span.end(status, error_type)
    trace.tracer.finished(span)
