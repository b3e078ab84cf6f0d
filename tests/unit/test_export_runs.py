"""Span export runs (gateway.observability.span_export.BoundedBatchProcessor): each on a thread
started for it, which ends once less than a batch waits; a full batch starts one at once, the
schedule_delay timer starts one for what waits, never two at a time, and flush and shutdown
export everything queued."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from gateway.config.model import TracingBatchConfig
from gateway.observability.span_export import BoundedBatchProcessor
from gateway.observability.spans import SpanRecord
from tests.support.process import async_wait_until
from tests.unit.test_span_queue import ended


class Exporter:
    """Counts what it is given, and the runs exporting at once; `gate` holds each export."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.exporting = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def encode(self, span: SpanRecord) -> bytes:
        return span.span_id.encode()

    def export(self, spans: Sequence[bytes]) -> bool:
        with self._lock:
            self.exporting += 1
            self.most_at_once = max(self.most_at_once, self.exporting)
        self.gate.wait(5)
        with self._lock:
            self.exporting -= 1
            self.batches.append(len(spans))
        return True

    def shutdown(self) -> None:
        pass


def export_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "gateway-span-export"]


def processor(exporter: Exporter, delay: float) -> BoundedBatchProcessor:
    batch = TracingBatchConfig(max_queue_size=100, max_export_batch_size=3, schedule_delay=delay)
    loop = asyncio.get_running_loop()
    return BoundedBatchProcessor(exporter, batch, lambda n, r: None, lambda n: None, loop, 2.0)


async def test_a_full_batch_is_exported_at_once_and_its_thread_ends() -> None:
    exporter = Exporter()
    export = processor(exporter, delay=60.0)  # the timer never fires in this test
    for i in range(3):
        export.spans.add(ended(f"{i:016x}"))
    await async_wait_until(lambda: exporter.batches == [3], within=5, what="the batch exported")
    for thread in export_threads():
        await asyncio.to_thread(thread.join, 5)
    assert export_threads() == []
    export.spans.add(ended("00000000000000ff"))  # less than a batch: it waits for the timer
    assert export.force_flush(5)
    assert exporter.batches == [3, 1]
    await asyncio.to_thread(export.shutdown)


async def test_what_waits_is_exported_by_the_timer() -> None:
    exporter = Exporter()
    export = processor(exporter, delay=0.02)
    export.spans.add(ended("0000000000000001"))
    await async_wait_until(lambda: exporter.batches == [1], within=5, what="the timer's export")
    await asyncio.to_thread(export.shutdown)


async def test_never_two_runs_at_once_and_shutdown_exports_the_rest() -> None:
    exporter = Exporter()
    exporter.gate.clear()  # the first export hangs until released
    export = processor(exporter, delay=60.0)
    for i in range(3):
        export.spans.add(ended(f"{i:016x}"))
    await async_wait_until(
        lambda: exporter.exporting == 1, within=5, what="the first run exporting"
    )
    for i in range(3, 11):  # two more batches' worth, and two spans
        export.spans.add(ended(f"{i:016x}"))
    assert len(export_threads()) == 1
    exporter.gate.set()
    await asyncio.to_thread(export.shutdown)
    assert exporter.most_at_once == 1
    assert sum(exporter.batches) == 11
    assert export_threads() == []
