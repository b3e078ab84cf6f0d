"""Getting finished spans out of the process: a bounded queue, export runs on a thread each
(ended with the run: BoundedBatchProcessor), and the three
exporters of SPEC "Tracing" — OTLP over HTTP/protobuf, OTLP over gRPC, and JSON lines on
stdout.  Imported only when spans are recorded (an exporter other than "none").

The queue is ours because a collector that is down or slow must never delay a request nor grow
memory: at most `batch.max_queue_size` spans wait, and every span lost — queue full, export
failed, still queued at shutdown — is counted (`gateway_tracing_spans_dropped_total{reason}`).
The bytes are ours too (gateway.observability.otlp_encoding, for the cost: see
gateway.observability.spans), written on the event loop as each span ends: the queue holds each
span's piece of an export request, and an export run joins a batch's pieces and sends them.  The
transports are the standard ones — http.client, and grpcio for gRPC (imported only for
`protocol: grpc`).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

from gateway.config.model import TracingBatchConfig, TracingConfig
from gateway.observability.logs import rfc3339
from gateway.observability.otlp_encoding import encode_span, export_request, resource_and_scope
from gateway.observability.spans import (
    CLIENT,
    SERVER,
    AttributeValue,
    SpanEncoder,
    SpanQueue,
    SpanRecord,
    attribute_pairs,
)

log = logging.getLogger("gateway.tracing")

#: writes an export request's body from a batch of encoded spans
_Body = Callable[[Sequence[bytes]], bytes]
#: OTLP/gRPC's one method (opentelemetry/proto/collector/trace/v1/trace_service.proto)
GRPC_EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class SpanExporter(Protocol):
    def encode(self, span: SpanRecord) -> bytes:
        """An ended span as this exporter's bytes (called on the event loop)."""

    def export(self, spans: Sequence[bytes]) -> bool:
        """Deliver `spans` (each as `encode` wrote it); False when they were not (they are
        then dropped and counted)."""

    def shutdown(self) -> None: ...


def resource_attributes(config: TracingConfig, version: str) -> list[tuple[str, AttributeValue]]:
    """The Resource every span is exported with: service.name and .version, the
    telemetry.sdk.* attributes the semantic conventions ask of whatever makes the spans, and
    the config's own (which win)."""
    attributes: dict[str, AttributeValue] = {
        "service.name": config.service_name,
        "telemetry.sdk.name": "gateway",
        "telemetry.sdk.language": "python",
    }
    if version:
        attributes["service.version"] = version
        attributes["telemetry.sdk.version"] = version
    attributes.update(config.resource)
    return list(attributes.items())


class OtlpHttpExporter:
    """POSTs each batch as application/x-protobuf on one kept-alive connection.  A connection
    the collector closed while idle is found out on the next export and replaced once, at
    once; any other failure (refused, timed out, a non-2xx answer) fails the batch."""

    def __init__(
        self, url: str, headers: Sequence[tuple[str, str]], timeout: float, body: _Body
    ) -> None:
        parts = urlsplit(url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout = timeout
        self._headers = {"Content-Type": "application/x-protobuf", **dict(headers)}
        self._body = body
        self._connection: http.client.HTTPConnection | None = None
        self.encode: SpanEncoder = encode_span

    def _connect(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def export(self, spans: Sequence[bytes]) -> bool:
        body = self._body(spans)
        for _ in range(2):
            reused = self._connection is not None
            connection = self._connection or self._connect()
            self._connection = connection
            try:
                connection.request("POST", self._path, body, self._headers)
                response = connection.getresponse()
                response.read()
            except (ConnectionResetError, BrokenPipeError) as exc:
                self._close()
                if reused:
                    continue  # the collector had closed the idle connection: one fresh try
                log.warning("span export to %s failed: %s", self._host, exc)
                return False
            except (OSError, http.client.HTTPException) as exc:
                self._close()
                log.warning("span export to %s failed: %s", self._host, exc)
                return False
            if response.will_close:
                self._close()
            if 200 <= response.status < 300:
                return True
            log.warning("span export to %s answered %d", self._host, response.status)
            return False
        return False

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def shutdown(self) -> None:
        self._close()


class OtlpGrpcExporter:
    """Calls TraceService/Export with the encoded request as the message (grpcio passes bytes
    through when no serializer is given); TLS when the endpoint is https://."""

    def __init__(
        self, url: str, headers: Sequence[tuple[str, str]], timeout: float, body: _Body
    ) -> None:
        import grpc

        parts = urlsplit(url)
        target = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 4317)}"
        if parts.scheme == "https":
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials())
        else:
            self._channel = grpc.insecure_channel(target)
        self._export: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(
            GRPC_EXPORT_METHOD
        )
        self._rpc_error: type[Exception] = grpc.RpcError
        # gRPC metadata keys are lower-case
        self._metadata = tuple((name.lower(), value) for name, value in headers)
        self._timeout = timeout
        self._body = body
        self.encode: SpanEncoder = encode_span

    def export(self, spans: Sequence[bytes]) -> bool:
        try:
            self._export(self._body(spans), timeout=self._timeout, metadata=self._metadata)
        except self._rpc_error as exc:
            log.warning("span export over gRPC failed: %s", _grpc_reason(exc))
            return False
        return True

    def shutdown(self) -> None:
        self._channel.close()


def _grpc_reason(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    return str(code()) if callable(code) else type(exc).__name__


_KIND_NAMES = {SERVER: "SERVER", CLIENT: "CLIENT"}


class ConsoleExporter:
    """One JSON object per span on stdout, beginning like every other line there: `time`
    (the span's end), `level`, `type` ("span")."""

    def __init__(self, resource: Sequence[tuple[str, AttributeValue]]) -> None:
        self._resource = dict(resource)

    def encode(self, span: SpanRecord) -> bytes:
        return json.dumps(self._line(span), separators=(",", ":")).encode()

    def export(self, spans: Sequence[bytes]) -> bool:
        sys.stdout.write((b"\n".join(spans) + b"\n").decode())
        sys.stdout.flush()
        return True

    def _line(self, span: SpanRecord) -> dict[str, Any]:
        return {
            "time": rfc3339(span.end_ns / 1e9),
            "level": "INFO",
            "type": "span",
            "name": span.name,
            "kind": _KIND_NAMES.get(span.kind, str(span.kind)),
            "trace_id": span.trace_id,
            "span_id": span.span_id,
            "parent_span_id": span.parent_span_id,
            "start_time_unix_nano": span.start_ns,
            "end_time_unix_nano": span.end_ns,
            "status": "ERROR" if span.error else "UNSET",
            "attributes": dict(attribute_pairs(span.attributes)),
            "events": [
                {
                    "name": name,
                    "time_unix_nano": at,
                    "attributes": dict(attribute_pairs(attributes)),
                }
                for name, at, attributes in span.events
            ],
            "resource": self._resource,
        }

    def shutdown(self) -> None:
        pass


def make_exporter(config: TracingConfig, version: str) -> SpanExporter:
    resource = resource_attributes(config, version)
    if config.exporter == "console":
        return ConsoleExporter(resource)
    resource_bytes, scope = resource_and_scope(resource, "gateway", version)

    def body(spans: Sequence[bytes]) -> bytes:
        return export_request(resource_bytes, scope, spans)

    if config.protocol == "grpc":
        return OtlpGrpcExporter(config.collector_url, config.headers, config.timeout, body)
    return OtlpHttpExporter(config.collector_url, config.headers, config.timeout, body)


class BoundedBatchProcessor:
    """Ended spans queue in `spans` (at most `max_queue_size`; the event loop adds them with
    `spans.add`) and are exported in batches of `max_export_batch_size`, at least every
    `schedule_delay`.  `on_dropped(count, reason)` hears of every span lost — "queue_full",
    "export_failed" or "shutdown" — and `on_exported` of every span delivered; both may be
    called from an export thread.

    Exports run on a thread started for them, which ends once the queue holds less than a
    batch: a thread that waited between exports would make the serving process multi-threaded
    for good, and every system call it makes pay for it (gateway.runtime.threads).  A timer on
    the event loop starts one every `schedule_delay` when spans wait, and a full batch starts one
    at once; at most one runs at a time.

    At shutdown what is queued is exported for at most `close_within` seconds (one export's
    timeout): a collector that is down must not hold a draining gateway past its own shutdown
    timeout, so what is left then is dropped as "shutdown"."""

    def __init__(
        self,
        exporter: SpanExporter,
        batch: TracingBatchConfig,
        on_dropped: Callable[[int, str], None],
        on_exported: Callable[[int], None],
        loop: asyncio.AbstractEventLoop,
        close_within: float = 10.0,
    ) -> None:
        self._exporter = exporter
        self._close_within = close_within
        self._batch_size = batch.max_export_batch_size
        self._delay = batch.schedule_delay
        self._on_dropped = on_dropped
        self._on_exported = on_exported
        self._loop = loop
        #: guards `_running`, `_again`, `_flushes`, `_thread` and `spans.closed`
        self._lock = threading.Lock()
        #: an export run is under way (on `_thread`, or in `shutdown`'s caller)
        self._running = False
        #: asked for while a run was under way: that run goes round once more
        self._again = False
        self._thread: threading.Thread | None = None
        self.spans = SpanQueue(
            batch.max_queue_size, self._batch_size, self._start, on_dropped, exporter.encode
        )
        self._queue = self.spans.spans
        #: flush requests waiting for the queue to empty
        self._flushes: list[threading.Event] = []
        self._timer = loop.call_later(self._delay, self._due)

    def _due(self) -> None:
        """Every `schedule_delay`, on the event loop: what waits is exported."""
        if self.spans.closed:
            return
        if self._queue:
            self._start()
        self._timer = self._loop.call_later(self._delay, self._due)

    def _start(self) -> None:
        """An export run, on a thread of its own unless one is under way."""
        with self._lock:
            if self._running:
                self._again = True
                return
            self._running = True
            thread = self._thread = threading.Thread(
                target=self._work, name="gateway-span-export", daemon=True
            )
        thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                closing = self.spans.closed
                flushes, self._flushes = self._flushes, []
                self._again = False
            give_up_at = time.monotonic() + self._close_within if closing else None
            while self._queue:
                if give_up_at is None and self.spans.closed:
                    # closed while this run was exporting: from now, one timeout's grace
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
            with self._lock:
                if self._again or self._flushes:
                    continue
                if not closing and len(self._queue) >= self._batch_size:
                    continue
                # less than a batch waits for the timer; the run (and its thread) ends
                self._running = False
                return

    def _export_one_batch(self) -> None:
        queue = self._queue
        batch = [queue.popleft() for _ in range(min(self._batch_size, len(queue)))]
        try:
            delivered = self._exporter.export(batch)
        except Exception:  # an exporter bug must not end the export run
            log.exception("span export raised")
            delivered = False
        if delivered:
            self._on_exported(len(batch))
        else:
            self._on_dropped(len(batch), "export_failed")

    def force_flush(self, timeout: float) -> bool:
        """Export everything queued now; False when that took longer than `timeout` seconds."""
        done = threading.Event()
        with self._lock:
            if self.spans.closed:
                return True
            self._flushes.append(done)
        self._start()
        return done.wait(timeout)

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout), then stop: on the
        caller's thread, or by waiting for the run under way."""
        with self._lock:
            if self.spans.closed:
                return
            self.spans.closed = True
            running = self._thread if self._running else None
            if running is None:
                self._running = True  # this thread runs the last export itself
            else:
                self._again = True
        # the timer is the loop's to cancel (RuntimeError: the loop closed, no timer runs)
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._timer.cancel)
        if running is None:
            self._work()
        else:
            running.join()
        with contextlib.suppress(Exception):
            self._exporter.shutdown()


def span_export(
    config: TracingConfig,
    version: str,
    on_dropped: Callable[[int, str], None],
    on_exported: Callable[[int], None],
    loop: asyncio.AbstractEventLoop,
) -> BoundedBatchProcessor:
    """The export side of one `tracing:` section: its exporter and the runs feeding it."""
    return BoundedBatchProcessor(
        make_exporter(config, version),
        config.batch,
        on_dropped,
        on_exported,
        loop,
        config.timeout,
    )
