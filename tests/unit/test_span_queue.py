"""The queue between the event loop and the export thread: an ended span is encoded as it is
queued, so the thread only ever joins and sends bytes; the queue's bounds and refusals are
counted, and an encoder that fails drops that span, never the request that ended it."""

from __future__ import annotations

import logging

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from gateway.observability.otlp_encoding import encode_span, export_request
from gateway.observability.spans import CLIENT, SERVER, SpanQueue, SpanRecord

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def ended(span_id: str, kind: int = SERVER) -> SpanRecord:
    record = SpanRecord(TRACE, span_id, "", False, "", kind, "GET /api/*", ["url.path", "/api"])
    record.end(200, None)
    return record


class Recorder:
    def __init__(self) -> None:
        self.wakes = 0
        self.dropped: list[tuple[int, str]] = []

    def wake(self) -> None:
        self.wakes += 1

    def on_dropped(self, count: int, reason: str) -> None:
        self.dropped.append((count, reason))


def test_an_ended_span_is_queued_as_its_export_bytes() -> None:
    seen = Recorder()
    queue = SpanQueue(8, 4, seen.wake, seen.on_dropped, encode_span)
    records = [ended("00f067aa0ba902b7"), ended("b7ad6b7169203331", CLIENT)]
    for record in records:
        queue.add(record)
    assert list(queue.spans) == [encode_span(record) for record in records]
    # the thread's whole part: the pieces joined into one request, which decodes
    message = ExportTraceServiceRequest()
    message.ParseFromString(export_request(b"", b"", list(queue.spans)))
    [resource_spans] = message.resource_spans
    [scope_spans] = resource_spans.scope_spans
    assert [s.span_id.hex() for s in scope_spans.spans] == ["00f067aa0ba902b7", "b7ad6b7169203331"]
    assert [s.attributes[0].value.string_value for s in scope_spans.spans] == ["/api"] * 2
    assert seen.dropped == []


def test_the_thread_is_woken_once_when_a_batch_is_waiting() -> None:
    seen = Recorder()
    queue = SpanQueue(8, 3, seen.wake, seen.on_dropped, encode_span)
    queue.add(ended("00f067aa0ba902b7"))
    queue.add(ended("00f067aa0ba902b8"))
    assert seen.wakes == 0
    queue.add(ended("00f067aa0ba902b9"))
    assert seen.wakes == 1
    queue.add(ended("00f067aa0ba902ba"))
    assert seen.wakes == 1


def test_a_full_queue_and_a_closed_one_refuse_and_count_without_encoding() -> None:
    seen = Recorder()
    encoded: list[SpanRecord] = []

    def encode(record: SpanRecord) -> bytes:
        encoded.append(record)
        return encode_span(record)

    queue = SpanQueue(2, 2, seen.wake, seen.on_dropped, encode)
    for n in range(3):
        queue.add(ended(f"00f067aa0ba902c{n}"))
    assert len(queue.spans) == 2
    assert seen.dropped == [(1, "queue_full")]
    queue.closed = True
    queue.add(ended("00f067aa0ba902d0"))
    assert seen.dropped == [(1, "queue_full"), (1, "shutdown")]
    assert len(encoded) == 2  # a refused span costs no encoding


def test_a_span_that_cannot_be_encoded_is_dropped_counted_and_logged_without_its_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen = Recorder()
    queue = SpanQueue(8, 4, seen.wake, seen.on_dropped, encode_span)
    secret = "token-\udcff"  # a lone surrogate: not UTF-8, as no request can make one
    broken = ended("00f067aa0ba902b7")
    broken.attributes.extend(["gateway.note", secret])
    with caplog.at_level(logging.WARNING, logger="gateway.tracing"):
        queue.add(broken)  # does not raise into the request that ended the span
        queue.add(ended("00f067aa0ba902b8"))
    assert seen.dropped == [(1, "export_failed")]
    assert len(queue.spans) == 1
    assert "could not be encoded (UnicodeEncodeError)" in caplog.text
    assert "token" not in caplog.text
