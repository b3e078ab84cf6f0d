"""Spans for sampled requests on opentelemetry-sdk, and their export (SPEC "Tracing", §2).

The data plane decides sampling and makes trace and span ids itself
(`gateway.core.trace_context`, `gateway.observability.request_trace`): an unsampled request never
touches the SDK, whose span machinery costs ~20 µs.  A sampled one gets real SDK spans — a SERVER
span per request, a CLIENT span per upstream try — created with the ids the data plane already
chose (`_GivenIds`), so the `traceparent` sent upstream and the exported spans agree.

Export runs on one thread of its own through `BoundedBatchProcessor`: spans wait in a bounded
queue and go out in batches; a full queue or a failed export drops spans and counts them
(`gateway_tracing_spans_dropped_total{reason}`), so a collector that is down or slow never
delays a request and never grows memory past `batch.max_queue_size` spans.  The SDK's own
BatchSpanProcessor drops silently (a log line), which is why this one exists.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gateway.config.model import TracingConfig
from gateway.core.trace_context import ParentContext, ratio_bound

if TYPE_CHECKING:
    import asyncio

    from opentelemetry.sdk.trace import Span

    from gateway.observability.instruments import CounterChild
    from gateway.observability.metrics import GatewayMetrics
    from gateway.observability.otel import SdkSpans


class Tracer:
    """One `tracing:` config at work: the sampling threshold for new traces, and — when spans
    are exported anywhere — the SDK provider and its export thread (gateway.observability.otel,
    imported only then).  Kept across reloads while the section is unchanged; a changed one
    gets a new Tracer and the old one is closed."""

    def __init__(
        self,
        config: TracingConfig,
        metrics: GatewayMetrics,
        loop: asyncio.AbstractEventLoop,
        version: str = "",
    ) -> None:
        self.config = config
        #: new traces are sampled under this (trace_context.ratio_bound of sample_ratio)
        self.bound = ratio_bound(config.sample_ratio)
        #: spans are made and exported (exporter other than "none"); otherwise a sampled
        #: request only carries the sampled flag on to its upstream
        self.recording = config.exporter != "none"
        self._loop = loop
        self._loop_thread = threading.get_ident()
        dropped = metrics.tracing_spans_dropped_total
        self._dropped: dict[str, CounterChild] = {
            reason: dropped.labels(reason) for reason in ("queue_full", "export_failed", "shutdown")
        }
        self._exported = metrics.tracing_spans_exported_total.labels()
        self._sdk: SdkSpans | None = None
        if self.recording:
            from gateway.observability.otel import SdkSpans

            self._sdk = SdkSpans(config, version, self._count_dropped, self._count_exported)

    # -- counting from either thread --

    def _on_loop(self, callback: Callable[[], None]) -> None:
        if threading.get_ident() == self._loop_thread:
            callback()
        elif not self._loop.is_closed():
            # the loop may close meanwhile: nobody reads the count then
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(callback)

    def _count_dropped(self, count: int, reason: str) -> None:
        child = self._dropped[reason]
        self._on_loop(lambda: child.inc(count))

    def _count_exported(self, count: int) -> None:
        child = self._exported
        self._on_loop(lambda: child.inc(count))

    # -- spans (sampled requests of a recording tracer only) --

    def server_span(
        self,
        trace_id: str,
        span_id: str,
        parent: ParentContext | None,
        name: str,
        attributes: Mapping[str, Any],
    ) -> Span:
        sdk = self._sdk
        assert sdk is not None
        return sdk.server_span(trace_id, span_id, parent, name, attributes)

    def client_span(
        self, server: Span, span_id: str, name: str, attributes: Mapping[str, Any]
    ) -> Span:
        sdk = self._sdk
        assert sdk is not None
        return sdk.client_span(server, span_id, name, attributes)

    def end(
        self,
        span: Span,
        status: int,
        error_type: str | None,
        attributes: Sequence[tuple[str, Any]] = (),
    ) -> None:
        from gateway.observability.otel import end_span

        end_span(span, status, error_type, attributes)

    # -- lifecycle --

    def flush(self, timeout: float = 5.0) -> bool:
        """Export what is queued now (tests, and a drain before exit)."""
        sdk = self._sdk
        return True if sdk is None else sdk.processor.force_flush(int(timeout * 1000))

    def close(self) -> None:
        """Export what is queued and stop the export thread (blocks up to the exporter's
        timeout: call it off the event loop)."""
        sdk = self._sdk
        if sdk is not None:
            sdk.close()
