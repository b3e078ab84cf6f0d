"""A span as the gateway records it: plain fields, filled on the event loop while a sampled
request runs, and turned into the bytes its exporter sends there too, as it ends
(gateway.observability.otlp_encoding for OTLP): the export thread only ever sees bytes.

Why not the OpenTelemetry SDK's spans: measured with callgrind on the bare route, a sampled
request cost ~380k instructions on the event loop in SDK span objects (contexts, locks, attribute
validation, a processor chain) and ~700k more on the export thread in the SDK's OTLP encoder —
at a 1 % sampling ratio that alone was ~11k instructions per request, over the whole budget of
tracing.  A record here is one object with slots and a few lists (compiled with the hot path).

Why encoded on the event loop rather than by the export thread: the instructions are the same,
but a thread that encodes takes the GIL from the loop again and again, and each hand-over
waits on the scheduler when the core is busy.  In `make bench`'s tracing scenario the move left
1 % sampling's throughput where it was (within the runs' noise) and lowered its p99 in each of
three runs (1.65-1.72 ms against 1.73-1.87 ms before; bench/README.md).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Final, final

log = logging.getLogger("gateway.tracing")

#: OTLP's Span.SpanKind values
SERVER: Final = 2
CLIENT: Final = 3

#: an attribute value: what OTLP's AnyValue carries that the gateway uses
AttributeValue = str | bool | int | float
#: attributes as one flat list, each name (a str) followed by its value: one list per span
#: rather than a tuple per attribute — fewer objects made on the event loop, and fewer for the
#: garbage collector to count
Attributes = list[AttributeValue]


def attribute_pairs(attributes: Attributes) -> list[tuple[str, AttributeValue]]:
    """(name, value) of each attribute of a flat list (for readers other than the encoder)."""
    return [(str(attributes[i]), attributes[i + 1]) for i in range(0, len(attributes), 2)]


@final
class SpanRecord:
    """One span: ids in lower-case hex (the parent's is "" for a root span), times in Unix
    nanoseconds, attributes and events in the order they were added.  Used only on the event
    loop: written until it ends, then encoded (`SpanQueue.add`) and dropped."""

    __slots__ = (
        "attributes",
        "end_ns",
        "error",
        "events",
        "kind",
        "name",
        "parent_is_remote",
        "parent_span_id",
        "span_id",
        "start_ns",
        "trace_id",
        "trace_state",
    )

    def __init__(
        self,
        trace_id: str,
        span_id: str,
        parent_span_id: str,
        parent_is_remote: bool,
        trace_state: str,
        kind: int,
        name: str,
        attributes: Attributes,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        #: the parent came in a `traceparent` (another process's span)
        self.parent_is_remote = parent_is_remote
        self.trace_state = trace_state
        self.kind = kind
        self.name = name
        self.attributes = attributes
        #: (name, time, attributes) of each event
        self.events: list[tuple[str, int, Attributes]] = []
        self.start_ns = time.time_ns()
        self.end_ns = 0
        #: the span's status is ERROR (else unset)
        self.error = False

    def add_event(self, name: str, attributes: Attributes) -> None:
        self.events.append((name, time.time_ns(), attributes))

    def end(
        self,
        status: int,
        error_type: str | None,
        attributes: Attributes | None = None,
    ) -> None:
        """Close the span with its outcome: the status code (0 when no response came), more
        attributes, and `error.type` with an error status when the exchange failed."""
        mine = self.attributes
        if status:
            mine.append("http.response.status_code")
            mine.append(status)
        if attributes is not None:
            mine.extend(attributes)
        if error_type is not None:
            mine.append("error.type")
            mine.append(error_type)
            self.error = True
        self.end_ns = time.time_ns()


#: an ended span as the bytes its exporter sends (otlp_encoding.encode_span, or a JSON line)
SpanEncoder = Callable[[SpanRecord], bytes]


@final
class SpanQueue:
    """Ended spans waiting for an export run (gateway.observability.span_export owns them),
    as their exporter's bytes (`encode`): at most `max_size` of them; `wake()` is called when a
    batch's worth is waiting, and `on_dropped(1, reason)` for each span refused — "queue_full",
    "shutdown" once `closed`, or "export_failed" if it could not be encoded.  Here, compiled,
    because every recorded span passes through `add` on the event loop."""

    __slots__ = ("batch_size", "closed", "encode", "max_size", "on_dropped", "spans", "wake")

    def __init__(
        self,
        max_size: int,
        batch_size: int,
        wake: Callable[[], None],
        on_dropped: Callable[[int, str], None],
        encode: SpanEncoder,
    ) -> None:
        self.spans: deque[bytes] = deque()
        self.max_size = max_size
        self.batch_size = batch_size
        self.wake = wake
        self.on_dropped = on_dropped
        self.encode = encode
        self.closed = False

    def add(self, span: SpanRecord) -> None:
        """Encode and queue an ended span (event loop thread)."""
        if self.closed:
            self.on_dropped(1, "shutdown")
            return
        spans = self.spans
        if len(spans) >= self.max_size:
            self.on_dropped(1, "queue_full")
            return
        try:
            encoded = self.encode(span)
        except Exception as exc:  # an encoder's bug must not fail the request that ended it
            log.warning("a span could not be encoded (%s): dropped", type(exc).__name__)
            self.on_dropped(1, "export_failed")
            return
        spans.append(encoded)
        if len(spans) == self.batch_size:
            self.wake()
