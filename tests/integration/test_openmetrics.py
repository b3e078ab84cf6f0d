"""/metrics as OpenMetrics over real sockets: what a scraper asking for it (Prometheus does by
default) gets, parsed by prometheus_client's strict OpenMetrics parser; the same numbers as the
Prometheus text; and the trace id of a sampled request as the duration bucket's exemplar."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as prometheus_families
from prometheus_client.samples import Sample

from gateway.app import Gateway
from tests.integration.test_tracing import PARENT, SAMPLED, TRACE, UNSAMPLED, get, traced_config
from tests.support.faulty import FaultyUpstream, faulty_upstreams
from tests.support.gateway import port_of, running_gateway
from tests.support.otlp import OtlpReceiver, otlp_receiver

#: what Prometheus sends by default (scrape_protocols: OpenMetrics first)
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKET = "gateway_request_duration_seconds_bucket"

#: (sample name, labels sorted) -> value
Values = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def metrics(gw: Gateway, accept: str | None) -> tuple[str, str]:
    """The /metrics answer (Content-Type, body) for this Accept (None: no Accept header)."""
    assert gw.admin is not None
    url = f"http://127.0.0.1:{gw.admin.port}/metrics"
    # aiohttp would send Accept: */* of its own; skip_auto_headers sends none
    headers = {} if accept is None else {"Accept": accept}
    async with (
        aiohttp.ClientSession(skip_auto_headers=["Accept"]) as session,
        session.get(url, headers=headers) as response,
    ):
        assert response.status == 200
        return response.headers["Content-Type"], await response.text()


def openmetrics_samples(text: str) -> tuple[dict[str, str], list[Sample]]:
    """The families' types by name, and every sample — the strict parser raises on any error."""
    families = list(openmetrics_families(text))
    return {f.name: f.type for f in families}, [s for f in families for s in f.samples]


def values(samples: list[Sample]) -> Values:
    # process_* move between two scrapes (CPU time, memory): the rest must not
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for s in samples
        if not s.name.startswith("process_")
    }


def exemplars(samples: list[Sample], route: str = "app") -> list[Sample]:
    """The duration buckets of `route` that carry an exemplar."""
    return [
        s
        for s in samples
        if s.name == DURATION_BUCKET and s.labels["route"] == route and s.exemplar is not None
    ]


@pytest.fixture
async def up() -> AsyncIterator[FaultyUpstream]:
    async with faulty_upstreams("up") as [upstream]:
        yield upstream


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    async with otlp_receiver() as r:
        yield r


async def test_openmetrics_is_what_prometheus_asks_for_and_has_the_prometheus_texts_numbers(
    tmp_path: Path, up: FaultyUpstream
) -> None:
    async with running_gateway(tmp_path, traced_config(up.url, None)) as gw:
        for _ in range(3):
            assert await get(port_of(gw)) == 200
        assert await get(port_of(gw), path="/nowhere") == 404
        content_type, text = await metrics(gw, PROMETHEUS_ACCEPT)
        _, plain = await metrics(gw, None)
    assert content_type == OPENMETRICS
    assert text.endswith("\n# EOF\n")
    types, samples = openmetrics_samples(text)
    # counters are named without _total, their samples with it; the info metrics are info
    assert types["gateway_requests"] == "counter"
    assert types["process_cpu_seconds"] == "counter"
    assert types["gateway_request_duration_seconds"] == "histogram"
    assert types["gateway_requests_in_flight"] == "gauge"
    assert types["gateway_build"] == "info"
    assert types["gateway_config"] == "info"
    assert "gateway_requests_total" not in types
    # the same samples with the same values as the Prometheus text
    prometheus = [s for f in prometheus_families(plain) for s in f.samples]
    assert values(samples) == values(prometheus)
    key = ("gateway_requests_total", (("code", "200"), ("method", "GET"), ("route", "app")))
    assert values(samples)[key] == 3
    # HELP keeps its quotes through OpenMetrics' escaping
    assert "# HELP gateway_tracing_spans_dropped Finished spans not exported: the export queue" in (
        text
    )
    assert '(reason \\"queue_full\\")' in text


@pytest.mark.parametrize(
    "accept",
    [
        None,
        "*/*",
        "text/plain",
        "text/plain;version=0.0.4",
        "application/openmetrics-text;version=2.0.0",
        "application/openmetrics-text;q=0,text/plain",
        "text/plain;q=1,application/openmetrics-text;q=0.5",
    ],
)
async def test_other_scrapers_get_the_prometheus_text_without_exemplars(
    tmp_path: Path, receiver: OtlpReceiver, up: FaultyUpstream, accept: str | None
) -> None:
    async with running_gateway(tmp_path, traced_config(up.url, receiver, sample_ratio=0)) as gw:
        assert await get(port_of(gw), f"traceparent: {SAMPLED}") == 200
        content_type, text = await metrics(gw, accept)
        # the exemplar is there for a scraper that asks for OpenMetrics
        _, samples = openmetrics_samples((await metrics(gw, PROMETHEUS_ACCEPT))[1])
        assert exemplars(samples)
    assert content_type == PROMETHEUS_TEXT
    assert "# EOF" not in text
    assert " # {" not in text
    assert TRACE not in text
    assert "# TYPE gateway_requests_total counter\n" in text
    assert "# TYPE gateway_build_info gauge\n" in text
    prometheus_families(text)  # still valid Prometheus text


async def test_a_sampled_request_is_its_duration_buckets_exemplar(
    tmp_path: Path, receiver: OtlpReceiver, up: FaultyUpstream
) -> None:
    async with running_gateway(tmp_path, traced_config(up.url, receiver, sample_ratio=0)) as gw:
        before = time.time()
        assert await get(port_of(gw), f"traceparent: {SAMPLED}") == 200
        after = time.time()
        _, text = await metrics(gw, PROMETHEUS_ACCEPT)
        tracer = gw.snapshot.tracer
        assert tracer is not None
        assert await asyncio.to_thread(tracer.flush)
        spans = await receiver.wait_for(2)
    _, samples = openmetrics_samples(text)
    [bucket] = exemplars(samples)
    exemplar = bucket.exemplar
    assert exemplar is not None
    # the SERVER span the collector got: its trace (the caller's) and its own span id
    [server] = [s for s in spans if s.kind == "SERVER"]
    assert server.parent_span_id == PARENT
    assert exemplar.labels == {"trace_id": TRACE, "span_id": server.span_id}
    assert re.fullmatch(r"[0-9a-f]{16}", exemplar.labels["span_id"])
    # the observed duration, within the bucket it is shown on, observed during the request
    le = float(bucket.labels["le"])
    lower = [float(s.labels["le"]) for s in samples if s.name == DURATION_BUCKET]
    below = max((b for b in lower if b < le), default=0.0)
    assert below < exemplar.value <= le
    assert exemplar.timestamp is not None
    assert before <= float(exemplar.timestamp) <= after + 1


@pytest.mark.parametrize(
    ("exported", "traceparent"),
    [
        (True, f"traceparent: {UNSAMPLED}"),
        (True, None),  # sample_ratio 0: a new trace is not sampled
        (False, f"traceparent: {SAMPLED}"),  # sampled, but no collector gets its spans
    ],
    ids=["unsampled-parent", "new-trace-unsampled", "sampled-not-exported"],
)
async def test_a_request_whose_trace_no_collector_has_leaves_no_exemplar(
    tmp_path: Path,
    receiver: OtlpReceiver,
    up: FaultyUpstream,
    exported: bool,
    traceparent: str | None,
) -> None:
    config = traced_config(up.url, receiver if exported else None, sample_ratio=0)
    async with running_gateway(tmp_path, config) as gw:
        headers = [traceparent] if traceparent else []
        assert await get(port_of(gw), *headers) == 200
        _, text = await metrics(gw, PROMETHEUS_ACCEPT)
    _, samples = openmetrics_samples(text)
    counted = [s for s in samples if s.name == "gateway_request_duration_seconds_count"]
    assert [s.value for s in counted if s.labels["route"] == "app"] == [1]
    assert exemplars(samples) == []
    assert " # {" not in text


async def test_the_latest_sampled_request_of_a_bucket_is_its_exemplar(
    tmp_path: Path, receiver: OtlpReceiver, up: FaultyUpstream
) -> None:
    traces = [f"{i:032x}" for i in range(1, 6)]
    async with running_gateway(tmp_path, traced_config(up.url, receiver, sample_ratio=0)) as gw:
        for trace in traces:
            assert await get(port_of(gw), f"traceparent: 00-{trace}-{PARENT}-01") == 200
            # an unsampled request after it does not take its place
            assert await get(port_of(gw), f"traceparent: 00-{'f' * 32}-{PARENT}-00") == 200
            _, text = await metrics(gw, PROMETHEUS_ACCEPT)
            _, samples = openmetrics_samples(text)
            shown = {s.exemplar.labels["trace_id"] for s in exemplars(samples) if s.exemplar}
            assert trace in shown
            assert shown <= set(traces)
