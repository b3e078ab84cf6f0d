"""The OpenTelemetry SDK side of tracing, imported only when spans are recorded (an exporter
other than "none"): a gateway with tracing off, or propagating only, never loads the SDK (about
6 MiB of resident memory).  See gateway.observability.tracing for the whole picture.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from gateway.config.model import TracingBatchConfig, TracingConfig
from gateway.core.trace_context import ParentContext

log = logging.getLogger("gateway.tracing")

_EMPTY: Final = Context()
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)


class _GivenIds(IdGenerator):
    """Hands the SDK the ids the data plane chose for the span it is about to start (the loop
    thread starts every span, one at a time)."""

    def __init__(self) -> None:
        self.next_trace_id = 0
        self.next_span_id = 0

    def generate_trace_id(self) -> int:
        return self.next_trace_id

    def generate_span_id(self) -> int:
        return self.next_span_id

    def is_trace_id_random(self) -> bool:
        return True


class BoundedBatchProcessor(SpanProcessor):
    """Ended spans queue here (at most `max_queue_size`) and one thread exports them in batches
    of `max_export_batch_size`, at least every `schedule_delay`.  `on_dropped(count, reason)`
    hears of every span lost — "queue_full", "export_failed" or "shutdown" — and `on_exported`
    of every span delivered; both may be called from the export thread.

    At shutdown what is queued is exported for at most `close_within` seconds (one export's
    timeout): a collector that is down must not hold a draining gateway past its own shutdown
    timeout, so what is left then is dropped as "shutdown"."""

    def __init__(
        self,
        exporter: SpanExporter,
        batch: TracingBatchConfig,
        on_dropped: Callable[[int, str], None],
        on_exported: Callable[[int], None],
        close_within: float = 10.0,
    ) -> None:
        self._exporter = exporter
        self._close_within = close_within
        self._max_queue = batch.max_queue_size
        self._batch_size = batch.max_export_batch_size
        self._delay = batch.schedule_delay
        self._on_dropped = on_dropped
        self._on_exported = on_exported
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        #: flush requests waiting for the queue to empty
        self._flushes: list[threading.Event] = []
        self._thread = threading.Thread(target=self._work, name="gateway-span-export", daemon=True)
        self._thread.start()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self._closed:
            self._on_dropped(1, "shutdown")
            return
        queue = self._queue
        if len(queue) >= self._max_queue:
            self._on_dropped(1, "queue_full")
            return
        queue.append(span)
        if len(queue) == self._batch_size:
            with self._wake:
                self._wake.notify()

    def _work(self) -> None:
        while True:
            with self._wake:
                if not self._closed and not self._flushes and len(self._queue) < self._batch_size:
                    self._wake.wait(self._delay)
                closing = self._closed
                flushes, self._flushes = self._flushes, []
            give_up_at = time.monotonic() + self._close_within if closing else None
            while self._queue:
                if give_up_at is None and self._closed:
                    # closed while this thread was exporting: from now, one timeout's grace
                    closing = True
                    give_up_at = time.monotonic() + self._close_within
                if give_up_at is not None and time.monotonic() >= give_up_at:
                    left = len(self._queue)
                    self._queue.clear()
                    self._on_dropped(left, "shutdown")
                    break
                self._export_one_batch()
                if not closing and not flushes and len(self._queue) < self._batch_size:
                    break
            for done in flushes:
                done.set()
            if closing:
                return

    def _export_one_batch(self) -> None:
        queue = self._queue
        batch = [queue.popleft() for _ in range(min(self._batch_size, len(queue)))]
        try:
            result = self._exporter.export(batch)
        except Exception:  # an exporter bug must not end the export thread
            log.exception("span export raised")
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self._on_exported(len(batch))
        else:
            self._on_dropped(len(batch), "export_failed")

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export everything queued now; False when that took longer than the timeout."""
        done = threading.Event()
        with self._wake:
            if self._closed:
                return True
            self._flushes.append(done)
            self._wake.notify()
        return done.wait(timeout_millis / 1000)

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout), then stop."""
        with self._wake:
            if self._closed:
                return
            self._closed = True
            self._wake.notify()
        self._thread.join()
        self._exporter.shutdown()


def _exporter(config: TracingConfig) -> SpanExporter:
    headers = dict(config.headers) or None
    if config.exporter == "console":
        # one JSON object per line, like every other line on stdout
        return ConsoleSpanExporter(
            out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        url = config.collector_url
        return GrpcExporter(
            endpoint=url,
            insecure=url.startswith("http://"),
            headers=headers,
            timeout=config.timeout,
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter(endpoint=config.collector_url, headers=headers, timeout=config.timeout)


class SdkSpans:
    """A TracerProvider with the ids the data plane chose and the bounded export processor."""

    def __init__(
        self,
        config: TracingConfig,
        version: str,
        on_dropped: Callable[[int, str], None],
        on_exported: Callable[[int], None],
    ) -> None:
        self._ids = _GivenIds()
        attributes: dict[str, Any] = {"service.name": config.service_name}
        attributes.update(config.resource)
        if version:
            attributes.setdefault("service.version", version)
        self.processor = BoundedBatchProcessor(
            _exporter(config), config.batch, on_dropped, on_exported, config.timeout
        )
        self._provider = TracerProvider(
            resource=Resource.create(attributes), id_generator=self._ids, sampler=ALWAYS_ON
        )
        self._provider.add_span_processor(self.processor)
        self._tracer = self._provider.get_tracer("gateway", version or None)

    def server_span(
        self,
        trace_id: str,
        span_id: str,
        parent: ParentContext | None,
        name: str,
        attributes: Mapping[str, Any],
    ) -> Span:
        ids = self._ids
        ids.next_span_id = int(span_id, 16)
        if parent is None:
            ids.next_trace_id = int(trace_id, 16)
            context = _EMPTY
        else:
            state = TraceState.from_header([parent.tracestate]) if parent.tracestate else None
            remote = SpanContext(
                int(trace_id, 16),
                int(parent.span_id, 16),
                is_remote=True,
                trace_flags=_SAMPLED,
                trace_state=state,
            )
            context = set_span_in_context(NonRecordingSpan(remote))
        span = self._tracer.start_span(name, context, SpanKind.SERVER, attributes)
        assert isinstance(span, Span)
        return span

    def client_span(
        self, server: Span, span_id: str, name: str, attributes: Mapping[str, Any]
    ) -> Span:
        self._ids.next_span_id = int(span_id, 16)
        span = self._tracer.start_span(
            name, set_span_in_context(server), SpanKind.CLIENT, attributes
        )
        assert isinstance(span, Span)
        return span

    def close(self) -> None:
        self._provider.shutdown()


def end_span(
    span: Span, status: int, error_type: str | None, attributes: Sequence[tuple[str, Any]] = ()
) -> None:
    """Close a span with its outcome: the status code (0 when no response came), `error.type`
    and an error status when the exchange failed."""
    if status:
        span.set_attribute("http.response.status_code", status)
    for key, value in attributes:
        span.set_attribute(key, value)
    if error_type is not None:
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR))
    span.end()
