"""One request's place in a trace: its ids, whether it is sampled, the `traceparent` each
upstream try carries, and — for a sampled request whose spans are exported — its span records.

Compiled with the hot path: an unsampled request pays for a random trace id, a random span id
and one header line per upstream try, and nothing else (no span is made for it).
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
from gateway.observability.spans import CLIENT, Attributes, SpanRecord

if TYPE_CHECKING:
    from gateway.observability.tracing import Tracer

#: what follows a try's span id: the flags and the line's end, then (with no tracestate to
#: add) the head's blank line; the trace lines are the head's last bytes
_SAMPLED_FLAGS: Final = b"-01\r\n"
_UNSAMPLED_FLAGS: Final = b"-00\r\n"
_SAMPLED_END: Final = _SAMPLED_FLAGS + b"\r\n"
_UNSAMPLED_END: Final = _UNSAMPLED_FLAGS + b"\r\n"


@final
class RequestTrace:
    """Written by the downstream connection when the request starts (`start_trace`); the proxy
    asks it for each try's head and span (`try_head`, `client_span`); stages add span events
    through `RequestContext.outcome`.

    Kept as the bytes the upstream sees — the trace id, and the flags (and `tracestate`) line
    end followed by the head's blank line.  The trace lines end the upstream head, so the first
    try's head is built with them in one copy (`first_try_lines`), and a later try's is that
    head with the last span id swapped (`try_head`).
    The ids as text and the SERVER span's id are made only when something reads them — a
    sampled request's spans, an access-log line, a log line — not for every unsampled
    request."""

    __slots__ = (
        "_end",
        "_first_unsent",
        "_span_id",
        "_trace_id",
        "_try_span_id",
        "parent",
        "sampled",
        "span",
        "tracer",
    )

    def __init__(
        self, tracer: Tracer, trace_id: bytes, sampled: bool, parent: ParentContext | None
    ) -> None:
        self.tracer = tracer
        self._trace_id = trace_id
        self._span_id = ""
        #: the CLIENT span id of the try being sent (`first_try_lines`, `try_head`)
        self._try_span_id = b""
        #: whether `first_try_lines` are made and no try has sent them yet
        self._first_unsent = False
        self.sampled = sampled
        self.parent = parent
        #: the SERVER span, for a sampled request whose spans are exported
        self.span: SpanRecord | None = None
        state = parent.tracestate if parent is not None else None
        if state is None:
            self._end = _SAMPLED_END if sampled else _UNSAMPLED_END
        else:
            # tracestate goes on unchanged with every try (bounded when it was read); latin-1:
            # the bytes as they came (the header was decoded so)
            flags = _SAMPLED_FLAGS if sampled else _UNSAMPLED_FLAGS
            self._end = flags + b"tracestate: " + state.encode("latin-1") + b"\r\n\r\n"

    def restart(self, tracer: Tracer, trace_id: bytes) -> None:
        """Become a new unsampled trace with no parent (see `TraceSlot.spare`).

        Only what differs from one such trace to the next is set (~80 instructions fewer
        than setting all): a spare is only ever unsampled, with no parent, no span and the
        unsampled line end (`start_trace`); a try's span id (`_try_span_id`) is read only
        for a span, and `_first_unsent` is set by `first_try_lines` before any try reads it.
        Not a method `__init__` calls either: the attributes would no longer be set in
        `__init__` itself, and compiled code then checks each one for being unset wherever
        it is read — measured, ~100 instructions more per unsampled request."""
        self.tracer = tracer
        self._trace_id = trace_id
        self._span_id = ""

    @property
    def trace_id(self) -> str:
        return self._trace_id.decode()

    @property
    def span_id(self) -> str:
        """The SERVER span's id (an unsampled request has one too: the access log names it)."""
        span_id = self._span_id
        if not span_id:
            span_id = self._span_id = new_span_id().decode()
        return span_id

    def first_try_lines(self) -> bytes:
        """The lines that end the upstream head (build_request_head's `trace_lines`): the
        `traceparent` of the first try's CLIENT span (and `tracestate`), and the blank line."""
        span_id = self._try_span_id = new_span_id()
        self._first_unsent = True
        return b"traceparent: 00-%b-%b%b" % (self._trace_id, span_id, self._end)

    def try_head(self, head: bytes) -> bytes:
        """The head a new upstream try sends, `head` being built with `first_try_lines`: the
        first try sends it as it is, each later one with a new span id in place of the last
        (its last bytes)."""
        if self._first_unsent:
            self._first_unsent = False
            return head
        span_id = self._try_span_id = new_span_id()
        end = self._end
        return b"%b%b%b" % (head[: -len(span_id) - len(end)], span_id, end)

    def client_span(
        self, method: str, upstream: str, host: str, port: int, resends: int
    ) -> SpanRecord | None:
        """The CLIENT span of the try `try_head` began, when this request's spans are recorded
        (attributes per the HTTP client semantic conventions); None for the others."""
        server = self.span
        if server is None:
            return None
        attributes: Attributes = [
            "http.request.method",
            method,
            "server.address",
            host,
            "server.port",
            port,
            "network.peer.address",
            host,
            "network.peer.port",
            port,
            "gateway.upstream",
            upstream,
        ]
        if resends:
            attributes.append("http.request.resend_count")
            attributes.append(resends)
        return SpanRecord(
            server.trace_id,
            self._try_span_id.decode(),
            server.span_id,
            False,
            server.trace_state,
            CLIENT,
            method,
            attributes,
        )

    def finished(self, span: SpanRecord) -> None:
        """One of this request's spans has ended: to the export queue (a compiled call)."""
        queue = self.tracer.span_queue
        if queue is not None:
            queue.add(span)

    def event(self, stage: str, decision: str) -> None:
        """A stage's decision, as the event `gateway.<stage>` on the SERVER span (sampled,
        recorded requests; nothing is built for the others)."""
        span = self.span
        if span is not None:
            span.add_event(f"gateway.{stage}", ["gateway.decision", decision])


def start_trace(
    tracer: Tracer,
    traceparent: bytes | None,
    tracestate: bytes | None,
    bound: bytes,
    slot: TraceSlot | None = None,
) -> RequestTrace:
    """Continue the trace a valid `traceparent` names (its sampled flag decides), or start a new
    one sampled by `bound` — unsampled, in `slot`'s spare object when there is a slot.
    `traceparent` is b"" when the request carried several."""
    parent = None
    if traceparent:
        state = [tracestate.decode("latin-1")] if tracestate else []
        parent = read_parent([traceparent.decode("latin-1")], state)
    if parent is None:
        trace_id = new_trace_id()
        sampled = sampled_by_ratio(trace_id, bound)
        if slot is None or sampled:
            return RequestTrace(tracer, trace_id, sampled, None)
        spare = slot.spare
        if spare is None:
            spare = slot.spare = RequestTrace(tracer, trace_id, False, None)
        else:
            spare.restart(tracer, trace_id)
        return spare
    return RequestTrace(tracer, parent.trace_id.encode(), parent.sampled, parent)


@final
class TraceSlot:
    """The trace of the request a connection is handling now, for log lines written meanwhile.

    A connection answers its requests one after another on one task, so it puts its slot in
    that task's context once (`CURRENT_TRACE`) and then only swaps `trace` per request — a
    ContextVar set and reset per request cost ~1k instructions.  A task a request starts copies
    the context, slot included: its lines name the request the connection is handling when they
    are written.

    `spare` is the one object each unsampled new trace on the connection is made in
    (`start_trace`, `RequestTrace.restart`): making and freeing one per request cost ~300 of
    an unsampled request's ~1.9k instructions of tracing (callgrind).  Safe because an unsampled
    trace is read only while its request runs — its ids by the proxy and the access log, its
    lines by log lines through this slot — and has no span for a late stage event to reach;
    a sampled or continued trace always gets an object of its own."""

    __slots__ = ("spare", "trace")

    def __init__(self) -> None:
        self.trace: RequestTrace | None = None
        self.spare: RequestTrace | None = None


#: the current connection's slot (set by the downstream connection in its task's context)
CURRENT_TRACE: Final[ContextVar[TraceSlot | None]] = ContextVar("gateway_trace", default=None)


def current_trace() -> RequestTrace | None:
    """The trace of the request being handled where this is called, if any."""
    slot = CURRENT_TRACE.get()
    return None if slot is None else slot.trace


def end_try(trace: RequestTrace, span: SpanRecord, status: int, error_type: str | None) -> None:
    """End a try's CLIENT span: a failure (`error_type`) or a status of 400 and up is an error
    (semantic conventions, client side)."""
    if error_type is None and status >= 400:
        error_type = str(status)
    span.end(status, error_type)
    trace.finished(span)
