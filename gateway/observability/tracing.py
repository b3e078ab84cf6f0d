"""Tracing's per-config part (SPEC "Tracing", §2): the sampling threshold, and for an exporter
other than "none" the export of finished spans.

The data plane decides sampling, makes trace and span ids (`gateway.core.trace_context`) and
records spans for sampled requests (`gateway.observability.request_trace`,
`gateway.observability.spans`); an unsampled request makes no span at all.  Finished spans
go to `gateway.observability.span_export`: a bounded queue and export runs off the loop, so a
collector that is down or slow never delays a request; lost spans are counted
(`gateway_tracing_spans_dropped_total{reason}`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.config.model import TracingConfig
from gateway.core.trace_context import ratio_bound

if TYPE_CHECKING:
    import asyncio

    from gateway.observability.instruments import CounterChild
    from gateway.observability.metrics import GatewayMetrics
    from gateway.observability.span_export import BoundedBatchProcessor
    from gateway.observability.spans import SpanQueue


class Tracer:
    """One `tracing:` config at work: the sampling threshold for new traces, and — when spans
    are exported anywhere — the export queue and thread (gateway.observability.span_export,
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
        self._export: BoundedBatchProcessor | None = None
        #: where ended spans go (request_trace.RequestTrace.finished), when they are exported
        self.span_queue: SpanQueue | None = None
        if self.recording:
            from gateway.observability.span_export import span_export

            self._export = span_export(
                config, version, self._count_dropped, self._count_exported, loop
            )
            self.span_queue = self._export.spans

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

    # -- lifecycle --

    def flush(self, timeout: float = 5.0) -> bool:
        """Export what is queued now (tests, and a drain before exit)."""
        export = self._export
        return True if export is None else export.force_flush(timeout)

    def close(self) -> None:
        """Export what is queued and stop exporting (blocks up to the exporter's
        timeout: call it off the event loop)."""
        export = self._export
        if export is not None:
            export.shutdown()
