"""Tracing over real sockets: W3C trace headers in and out, spans exported to a real OTLP/HTTP
receiver, the upstream seeing the gateway's CLIENT span as its parent, and the access log
naming the trace."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.core.trace_context import parse_traceparent
from gateway.observability.logs import JsonFormatter
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.faulty import FaultyUpstream, closed_port, faulty_upstreams
from tests.support.gateway import port_of, running_gateway, write_config
from tests.support.otlp import OtlpReceiver, ReceivedSpan, otlp_grpc_receiver, otlp_receiver
from tests.support.process import async_wait_until
from tests.support.raw import close_writer, exchange, open_raw, read_response

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE}-{PARENT}-01"
UNSAMPLED = f"00-{TRACE}-{PARENT}-00"


def traced_config(
    upstream_url: str,
    receiver: OtlpReceiver | None,
    *,
    sample_ratio: float = 1.0,
    pipeline: list[Mapping[str, Any]] | None = None,
    route_tracing: Mapping[str, Any] | None = None,
    access_log: Mapping[str, Any] | None = None,
    trusted_proxies: list[str] | None = None,
) -> str:
    tracing: dict[str, Any] = {"service_name": "edge-test", "sample_ratio": sample_ratio}
    if receiver is not None:
        tracing |= {
            "exporter": "otlp",
            "endpoint": receiver.url,
            "timeout": "2s",
            "batch": {"schedule_delay": "50ms"},
            "resource": {"deployment.environment.name": "test"},
        }
    options: dict[str, Any] = {}
    if pipeline:
        options["pipeline"] = pipeline
    if route_tracing is not None:
        options["tracing"] = route_tracing
    return gateway_yaml(
        access_log=access_log,
        tracing=tracing,
        upstreams={"app": upstream_to(upstream_url)},
        routes=[route("app", "app", "/api", **options)],
        trusted_proxies=trusted_proxies,
    )


async def get(port: int, *headers: str, path: str = "/api/items") -> int:
    extra = "".join(f"{h}\r\n" for h in headers)
    response = await exchange(
        port, f"GET {path} HTTP/1.1\r\nHost: edge.test\r\n{extra}\r\n".encode()
    )
    return response.status


def header(up: FaultyUpstream, name: str, request: int = -1) -> list[str]:
    return [v for n, v in up.seen_headers[request] if n == name]


async def flushed(gw: Gateway) -> None:
    tracer = gw.snapshot.tracer
    assert tracer is not None
    assert await asyncio.to_thread(tracer.flush)


def by_kind(spans: list[ReceivedSpan], kind: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.kind == kind]


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    async with otlp_receiver() as r:
        yield r


@pytest.fixture
async def up() -> AsyncIterator[FaultyUpstream]:
    async with faulty_upstreams("up") as [upstream]:
        yield upstream


async def test_a_sampled_parent_is_continued_and_the_upstream_sees_the_client_span(
    tmp_path: Path, receiver: OtlpReceiver, up: FaultyUpstream
) -> None:
    async with running_gateway(tmp_path, traced_config(up.url, receiver, sample_ratio=0)) as gw:
        status = await get(port_of(gw), f"traceparent: {SAMPLED}", "tracestate: congo=t61rcWkgMzE")
        assert status == 200
        await flushed(gw)
        spans = await receiver.wait_for(2)
    assert len(spans) == 2
    [server] = by_kind(spans, "SERVER")
    [client] = by_kind(spans, "CLIENT")
    # the incoming trace is kept, and the SERVER span is the incoming span's child
    assert (server.trace_id, server.parent_span_id) == (TRACE, PARENT)
    assert (client.trace_id, client.parent_span_id) == (TRACE, server.span_id)
    # the upstream's parent is the gateway's CLIENT span for that try
    [sent] = header(up, "traceparent")
    assert parse_traceparent(sent) == (TRACE, client.span_id, True)
    assert header(up, "tracestate") == ["congo=t61rcWkgMzE"]
    assert server.name == "GET /api/*"
    assert server.attributes | {"client.address": "127.0.0.1"} == server.attributes
    for key, value in {
        "http.request.method": "GET",
        "http.route": "/api/*",
        "url.path": "/api/items",
        "url.scheme": "http",
        "http.response.status_code": 200,
        "server.address": "edge.test",
        "network.peer.address": "127.0.0.1",
        "gateway.route": "app",
    }.items():
        assert server.attributes[key] == value, key
    assert client.name == "GET"
    assert client.attributes["http.response.status_code"] == 200
    assert client.attributes["server.port"] == up.port
    assert client.attributes["gateway.upstream"] == "app"
    assert not server.error
    assert not client.error
    assert server.resource["service.name"] == "edge-test"
    assert server.resource["deployment.environment.name"] == "test"


async def test_behind_a_trusted_proxy_client_address_is_the_forwarded_client(
    tmp_path: Path, receiver: OtlpReceiver, up: FaultyUpstream
) -> None:
    config = traced_config(up.url, receiver, trusted_proxies=["127.0.0.0/8"])
    async with running_gateway(tmp_path, config) as gw:
        assert await get(port_of(gw), "X-Forwarded-For: 198.51.100.7, 127.0.0.9") == 200
        await flushed(gw)
        spans = await receiver.wait_for(2)
    [server] = by_kind(spans, "SERVER")
    # semantic conventions: client.address is the original client (from X-Forwarded-For when
    # the peer is trusted), network.peer.address the connection's peer
    assert server.attributes["client.address"] == "198.51.100.7"
    assert server.attributes["network.peer.address"] == "127.0.0.1"


async def test_tracestate_bytes_beyond_ascii_go_on_as_they_came(
    tmp_path: Path, up: FaultyUpstream
) -> None:
    """obs-text in a field value is legal HTTP: `tracestate` goes upstream byte for byte (here
    the UTF-8 of "é"), not re-encoded."""
    async with running_gateway(tmp_path, traced_config(up.url, None, sample_ratio=0)) as gw:
        status = await get(port_of(gw), f"traceparent: {SAMPLED}", "tracestate: k=café")
        assert status == 200
    # the upstream records header bytes as latin-1 text: the same two bytes as sent
    assert header(up, "tracestate") == ["k=café".encode().decode("latin-1")]


@pytest.mark.parametrize("parent", [(), (f"traceparent: {SAMPLED}", "tracestate: a=1,b=2")])
@pytest.mark.parametrize(
    "framing",
    [
        ("Content-Length: 11\r\n", b"hello world"),
        ("Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
    ],
    ids=["content-length", "chunked"],
)
async def test_a_traced_request_body_follows_the_trace_lines_intact(
    tmp_path: Path, up: FaultyUpstream, parent: tuple[str, ...], framing: tuple[str, bytes]
) -> None:
    """Each try's trace lines end the head the gateway built: the body after them reaches the
    upstream whole, as one request, and the upstream sees one traceparent (and tracestate)."""
    framing_line, body = framing
    extra = "".join(f"{h}\r\n" for h in parent)
    async with running_gateway(tmp_path, traced_config(up.url, None, sample_ratio=0)) as gw:
        response = await exchange(
            port_of(gw),
            f"POST /api/items HTTP/1.1\r\nHost: edge.test\r\n{extra}{framing_line}\r\n".encode()
            + body,
        )
    assert response.status == 200
    assert response.body == b"hello world"
    assert up.requests["POST"] == 1
    [sent] = header(up, "traceparent")
    parsed = parse_traceparent(sent)
    assert parsed is not None
    assert parsed[0] == TRACE if parent else parsed[0] != TRACE
    assert header(up, "tracestate") == (["a=1,b=2"] if parent else [])


async def test_an_unsampled_parent_propagates_without_spans(
    tmp_path: Path, receiver: OtlpReceiver, up: FaultyUpstream
) -> None:
    async with running_gateway(tmp_path, traced_config(up.url, receiver, sample_ratio=1)) as gw:
        assert await get(port_of(gw), f"traceparent: {UNSAMPLED}") == 200
        await flushed(gw)
    assert receiver.spans == []
    [sent] = header(up, "traceparent")
    parsed = parse_traceparent(sent)
    assert parsed is not None
    trace_id, parent, sampled = parsed
    # the same trace, not sampled, and a parent of the gateway's own (not the client's span)
    assert (trace_id, sampled) == (TRACE, False)
    assert parent != PARENT


@pytest.mark.parametrize(
    ("ratio", "spans"), [(0.0, 0), (1.0, 2)], ids=["ratio-0-none", "ratio-1-all"]
)
async def test_a_new_trace_is_sampled_by_the_ratio(
    tmp_path: Path, receiver: OtlpReceiver, up: FaultyUpstream, ratio: float, spans: int
) -> None:
    async with running_gateway(tmp_path, traced_config(up.url, receiver, sample_ratio=ratio)) as gw:
        assert await get(port_of(gw)) == 200
        await flushed(gw)
        if spans:
            await receiver.wait_for(spans)
    assert len(receiver.spans) == spans
    [sent] = header(up, "traceparent")
    parsed = parse_traceparent(sent)
    assert parsed is not None
    assert parsed[2] is (ratio == 1.0)
    assert parsed[0] != TRACE
    if spans:
        [server] = by_kind(receiver.spans, "SERVER")
        [client] = by_kind(receiver.spans, "CLIENT")
        assert server.parent_span_id == ""  # a root
        assert parsed[:2] == (server.trace_id, client.span_id)


@pytest.mark.parametrize(
    "headers",
    [
        (f"traceparent: 00-{TRACE.upper()}-{PARENT}-01",),
        (f"traceparent: ff-{TRACE}-{PARENT}-01",),
        (f"traceparent: 00-{'0' * 32}-{PARENT}-01",),
        ("traceparent: garbage", "tracestate: a=1"),
        (f"traceparent: {SAMPLED}", f"traceparent: {SAMPLED}"),
    ],
    ids=["upper-case", "version-ff", "zero-trace", "garbage", "two-headers"],
)
async def test_an_invalid_traceparent_starts_a_new_trace_never_a_400(
    tmp_path: Path, up: FaultyUpstream, headers: tuple[str, ...]
) -> None:
    async with running_gateway(tmp_path, traced_config(up.url, None, sample_ratio=0)) as gw:
        assert await get(port_of(gw), *headers) == 200
    [sent] = header(up, "traceparent")
    parsed = parse_traceparent(sent)
    assert parsed is not None
    assert parsed[0] != TRACE
    assert parsed[2] is False
    # tracestate is only read with a valid traceparent
    assert header(up, "tracestate") == []


async def test_each_retry_is_a_client_span_and_the_upstream_sees_each(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    async with faulty_upstreams("bad", "good") as [bad, good]:
        bad.mode = "status:503"
        retry = {"retry": {"attempts": 2, "backoff": {"base": "1ms", "max": "2ms"}}}
        tracing = {
            "sample_ratio": 1,
            "exporter": "otlp",
            "endpoint": receiver.url,
            "batch": {"schedule_delay": "50ms"},
        }
        config = gateway_yaml(
            tracing=tracing,
            upstreams={"app": upstream_to(bad.url, good.url)},
            routes=[route("app", "app", pipeline=[retry])],
        )
        async with running_gateway(tmp_path, config) as gw:
            # round robin: some request meets the bad endpoint first and is retried
            for _ in range(2):
                assert await get(port_of(gw)) == 200
            await flushed(gw)
            spans = await receiver.wait_for(5)
        sent = {
            parse_traceparent(v)
            for u in (bad, good)
            for request in u.seen_headers
            for n, v in request
            if n == "traceparent"
        }
    retried_event = ("gateway.retry", {"gateway.decision": "retried:1"})
    retried = [s for s in by_kind(spans, "SERVER") if retried_event in s.events]
    assert retried
    for server in retried:
        tries = [s for s in by_kind(spans, "CLIENT") if s.parent_span_id == server.span_id]
        assert len(tries) == 2
        first, second = sorted(
            tries, key=lambda s: int(s.attributes.get("http.request.resend_count", 0))
        )
        assert first.attributes["http.response.status_code"] == 503
        assert first.error  # a client span's 5xx is an error
        assert second.attributes["http.request.resend_count"] == 1
        assert second.attributes["http.response.status_code"] == 200
        assert not server.error
        # every try's own span (two spans, two ids) is the parent the upstream saw
        assert first.span_id != second.span_id
        assert {(server.trace_id, t.span_id, True) for t in tries} <= sent


async def test_a_retried_try_with_a_body_and_tracestate_carries_its_own_trace_lines(
    tmp_path: Path,
) -> None:
    """A later try reuses the first try's head with its own trace lines in place of the first
    ones: both upstreams get one traceparent (each its try's), the tracestate once, and the
    whole body after the head."""
    async with faulty_upstreams("bad", "good") as [bad, good]:
        bad.mode = "status:503"
        retry = {"retry": {"attempts": 2, "backoff": {"base": "1ms", "max": "2ms"}}}
        config = gateway_yaml(
            tracing={"sample_ratio": 0},
            upstreams={"app": upstream_to(bad.url, good.url)},
            routes=[route("app", "app", pipeline=[retry])],
        )
        async with running_gateway(tmp_path, config) as gw:
            for _ in range(2):  # round robin: one of them at least meets the bad endpoint first
                response = await exchange(
                    port_of(gw),
                    b"PUT /items/1 HTTP/1.1\r\nHost: edge.test\r\n"
                    + f"traceparent: {SAMPLED}\r\ntracestate: a=1,b=2\r\n".encode()
                    + b"Content-Length: 11\r\n\r\nhello world",
                )
                assert response.status == 200
                assert response.body == b"hello world"
    # each request ends at the good endpoint once; one or both met the bad one first
    assert good.requests["PUT"] == 2
    assert bad.requests["PUT"] in (1, 2)
    seen = [*bad.seen_headers, *good.seen_headers]
    parents = []
    for request in seen:
        [traceparent] = [v for n, v in request if n == "traceparent"]
        assert [v for n, v in request if n == "tracestate"] == ["a=1,b=2"]
        parsed = parse_traceparent(traceparent)
        assert parsed is not None
        assert parsed[0] == TRACE
        parents.append(parsed[1])
    assert len(set(parents)) == len(seen)  # every try its own CLIENT span


async def test_rejections_are_span_events_and_a_5xx_marks_the_server_span(
    tmp_path: Path, receiver: OtlpReceiver, up: FaultyUpstream
) -> None:
    limit = {"rate_limit": {"rate": 1, "per": "1m", "burst": 1, "key": "client_ip"}}
    config = traced_config(up.url, receiver, pipeline=[limit])
    async with running_gateway(tmp_path, config) as gw:
        assert await get(port_of(gw)) == 200
        assert await get(port_of(gw)) == 429
        up.mode = "status:502"
        await flushed(gw)
        spans = await receiver.wait_for(3)
    servers = by_kind(spans, "SERVER")
    limited = [s for s in servers if s.attributes["http.response.status_code"] == 429]
    assert len(limited) == 1
    assert ("gateway.rate_limit", {"gateway.decision": "limited"}) in limited[0].events
    assert not limited[0].error  # a 4xx is the client's
    # the refused request never reached an upstream: no CLIENT span of its own
    assert not [s for s in spans if s.parent_span_id == limited[0].span_id]


async def test_an_upstream_5xx_marks_both_spans_as_errors(
    tmp_path: Path, receiver: OtlpReceiver, up: FaultyUpstream
) -> None:
    up.mode = "status:502"
    async with running_gateway(tmp_path, traced_config(up.url, receiver)) as gw:
        assert await get(port_of(gw)) == 502
        await flushed(gw)
        spans = await receiver.wait_for(2)
    [server] = by_kind(spans, "SERVER")
    [client] = by_kind(spans, "CLIENT")
    assert server.error
    assert server.attributes["error.type"] == "502"
    assert client.error


async def test_the_access_log_names_the_trace_and_the_server_span(
    tmp_path: Path, up: FaultyUpstream, capfd: pytest.CaptureFixture[str]
) -> None:
    config = traced_config(up.url, None, sample_ratio=0, access_log={"enabled": True})
    async with running_gateway(tmp_path, config) as gw:
        assert await get(port_of(gw), f"traceparent: {UNSAMPLED}") == 200
        gw.snapshot.access_log.flush()
    lines = [json.loads(x) for x in capfd.readouterr().out.splitlines() if x.startswith("{")]
    [line] = [x for x in lines if x.get("route") == "app"]
    assert line["trace_id"] == TRACE
    [sent] = header(up, "traceparent")
    assert len(line["span_id"]) == 16
    assert line["span_id"] not in (PARENT, sent.split("-")[2])


async def test_each_request_on_a_kept_alive_connection_has_its_own_trace(
    tmp_path: Path, up: FaultyUpstream, capfd: pytest.CaptureFixture[str]
) -> None:
    """Unsampled new traces on one connection share an object (TraceSlot.spare): nothing of a
    request's trace may reach the next — ids on the wire, ids in the access log."""
    config = traced_config(up.url, None, sample_ratio=0, access_log={"enabled": True})
    parents = ["", "", f"traceparent: {SAMPLED}\r\n", "", f"traceparent: {UNSAMPLED}\r\n", ""]
    async with running_gateway(tmp_path, config) as gw:
        reader, writer = await open_raw(port_of(gw))
        try:
            for n, parent in enumerate(parents):
                writer.write(
                    f"GET /api/{n} HTTP/1.1\r\nHost: edge.test\r\n{parent}\r\n".encode()
                )
                assert (await read_response(reader)).status == 200
        finally:
            await close_writer(writer)
        gw.snapshot.access_log.flush()
    sent = [header(up, "traceparent", n) for n in range(len(parents))]
    assert all(len(values) == 1 for values in sent)
    parsed = [parse_traceparent(values[0]) for values in sent]
    lines = [json.loads(x) for x in capfd.readouterr().out.splitlines() if x.startswith("{")]
    logged = {x["path"]: x for x in lines if x.get("route") == "app"}
    assert len(logged) == len(parents)
    new_traces = set()
    for n, (parent, ids) in enumerate(zip(parents, parsed, strict=True)):
        assert ids is not None
        trace_id, span_id, sampled = ids
        line = logged[f"/api/{n}"]
        assert line["trace_id"] == trace_id
        assert line["span_id"] not in (span_id, PARENT)
        assert sampled is (parent == f"traceparent: {SAMPLED}\r\n")
        if parent:
            assert trace_id == TRACE
        else:
            new_traces.add(trace_id)
    assert len(new_traces) == parents.count("")
    assert len({x["span_id"] for x in logged.values()}) == len(parents)
    assert len({ids[1] for ids in parsed if ids is not None}) == len(parents)


class _Lines(logging.Handler):
    """Application log lines as the gateway formats them."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


async def test_a_log_line_written_during_a_request_names_that_request_and_no_other(
    tmp_path: Path,
) -> None:
    """Two requests on one keep-alive connection, each failing on its own endpoint: the
    ejection warning each causes names that request's trace."""
    async with faulty_upstreams("a", "b") as [a, b]:
        a.mode = b.mode = "reset"
        config = gateway_yaml(
            tracing={"sample_ratio": 0},
            upstreams={
                "app": upstream_to(
                    a.url,
                    b.url,
                    outlier_detection={"consecutive_failures": 1, "max_ejected_percent": 100},
                )
            },
            routes=[route("app", "app")],
        )
        handler = _Lines()
        logger = logging.getLogger("gateway")
        logger.addHandler(handler)
        try:
            async with running_gateway(tmp_path, config) as gw:
                reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
                try:
                    for trace in ("1" * 32, "2" * 32):
                        writer.write(
                            f"GET /x HTTP/1.1\r\nHost: t\r\n"
                            f"traceparent: 00-{trace}-{PARENT}-00\r\n\r\n".encode()
                        )
                        head = await reader.readuntil(b"\r\n\r\n")
                        assert head.startswith(b"HTTP/1.1 502")
                        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                        await reader.readexactly(length)
                finally:
                    writer.close()
                logger.warning("after the requests")
        finally:
            logger.removeHandler(handler)
    ejections = [x for x in handler.lines if "out of rotation" in x["message"]]
    assert [x.get("trace_id") for x in ejections] == ["1" * 32, "2" * 32]
    assert all(len(x["span_id"]) == 16 for x in ejections)
    [after] = [x for x in handler.lines if x["message"] == "after the requests"]
    assert "trace_id" not in after


async def test_tracing_off_passes_trace_headers_through_untouched(
    tmp_path: Path, up: FaultyUpstream
) -> None:
    config = gateway_yaml(
        upstreams={"app": upstream_to(up.url)}, routes=[route("app", "app", "/api")]
    )
    async with running_gateway(tmp_path, config) as gw:
        assert gw.snapshot.tracer is None
        assert await get(port_of(gw), f"traceparent: {SAMPLED}", "tracestate: a=1") == 200
    assert header(up, "traceparent") == [SAMPLED]
    assert header(up, "tracestate") == ["a=1"]


async def test_a_route_override_of_zero_samples_no_new_trace(
    tmp_path: Path, receiver: OtlpReceiver, up: FaultyUpstream
) -> None:
    config = traced_config(up.url, receiver, sample_ratio=1, route_tracing={"sample_ratio": 0})
    async with running_gateway(tmp_path, config) as gw:
        for _ in range(3):
            assert await get(port_of(gw)) == 200
        await flushed(gw)
    assert receiver.spans == []
    for i in range(3):
        parsed = parse_traceparent(header(up, "traceparent", i)[0])
        assert parsed is not None
        assert parsed[2] is False


def span_counts(gw: Gateway) -> tuple[float, dict[str, float]]:
    """(spans exported, spans dropped by reason), from the gateway's own counters."""
    exported = gw.metrics.tracing_spans_exported_total.labels().value
    dropped = gw.metrics.tracing_spans_dropped_total
    return exported, {r: dropped.labels(r).value for r in ("queue_full", "export_failed")}


def shutdown_drops(gw: Gateway) -> float:
    return gw.metrics.tracing_spans_dropped_total.labels("shutdown").value


def accounted(gw: Gateway) -> float:
    exported, dropped = span_counts(gw)
    return exported + sum(dropped.values()) + shutdown_drops(gw)


def collector_config(up: FaultyUpstream, receiver_url: str, queue: int, batch: int) -> str:
    tracing = {
        "sample_ratio": 1,
        "exporter": "otlp",
        "endpoint": receiver_url,
        "timeout": "1s",
        "batch": {
            "max_queue_size": queue,
            "max_export_batch_size": batch,
            "schedule_delay": "20ms",
        },
    }
    return gateway_yaml(
        tracing=tracing, upstreams={"app": upstream_to(up.url)}, routes=[route("app", "app")]
    )


async def test_a_hung_collector_delays_no_request_bounds_the_queue_and_counts_every_span(
    tmp_path: Path, receiver: OtlpReceiver, up: FaultyUpstream
) -> None:
    receiver.mode = "hang"
    requests = 40
    async with running_gateway(tmp_path, collector_config(up, receiver.url, 8, 4)) as gw:
        started = asyncio.get_running_loop().time()
        for _ in range(requests):
            assert await get(port_of(gw)) == 200
        elapsed = asyncio.get_running_loop().time() - started
        # the export thread is stuck on the collector: requests do not wait for it (each one
        # alone takes a few ms; one export's timeout is 1 s)
        assert elapsed < 5.0
        exported, dropped = span_counts(gw)
        assert exported == 0
        # at most 8 wait in the queue, plus a batch of 4 in each export the collector saw
        assert dropped["queue_full"] >= 2 * requests - 8 - 4 * receiver.exports
        # the collector answers again: what is queued goes out, and every span is accounted for
        receiver.mode = "ok"
        receiver.release.set()
        await flushed(gw)
        await async_wait_until(
            lambda: sum(span_counts(gw)[1].values()) + span_counts(gw)[0] == 2 * requests
        )
        exported, dropped = span_counts(gw)
        assert exported == len(receiver.spans)
        assert exported > 0
        # and a new request's spans are exported again
        assert await get(port_of(gw)) == 200
        await flushed(gw)
        await receiver.wait_for(int(exported) + 2)


async def test_a_failing_collector_drops_and_counts_then_export_resumes(
    tmp_path: Path, receiver: OtlpReceiver, up: FaultyUpstream
) -> None:
    receiver.mode = "fail"
    async with running_gateway(tmp_path, collector_config(up, receiver.url, 64, 16)) as gw:
        for _ in range(3):
            assert await get(port_of(gw)) == 200
        await flushed(gw)
        await async_wait_until(lambda: span_counts(gw)[1]["export_failed"] == 6)
        assert span_counts(gw)[0] == 0
        receiver.mode = "ok"
        assert await get(port_of(gw)) == 200
        await flushed(gw)
        spans = await receiver.wait_for(2)
        await async_wait_until(lambda: span_counts(gw)[0] == 2)
    assert len(spans) == 2
    assert span_counts(gw)[1] == {"queue_full": 0, "export_failed": 6}


async def test_a_collector_closing_an_idle_connection_loses_no_span(
    tmp_path: Path, receiver: OtlpReceiver, up: FaultyUpstream
) -> None:
    """The exporter keeps its connection to the collector; when the collector has closed it
    meanwhile, the next batch goes on a fresh one — once, not lost, not sent twice."""
    async with running_gateway(tmp_path, collector_config(up, receiver.url, 64, 16)) as gw:
        assert await get(port_of(gw)) == 200
        await flushed(gw)
        await receiver.wait_for(2)
        [first] = set(receiver.transports)
        first.close()
        assert await get(port_of(gw)) == 200
        await flushed(gw)
        spans = await receiver.wait_for(4)
        await async_wait_until(lambda: span_counts(gw)[0] == 4)
        assert span_counts(gw)[1] == {"queue_full": 0, "export_failed": 0}
    assert receiver.exports == 2
    assert len(spans) == 4
    assert len(set(receiver.transports)) == 2


async def test_an_unreachable_collector_only_costs_the_spans(
    tmp_path: Path, up: FaultyUpstream
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}/v1/traces"
    async with running_gateway(tmp_path, collector_config(up, dead, 64, 16)) as gw:
        for _ in range(3):
            assert await get(port_of(gw)) == 200
        await flushed(gw)
        await async_wait_until(lambda: span_counts(gw)[1]["export_failed"] == 6)
        assert span_counts(gw)[0] == 0


async def test_spans_go_out_over_otlp_grpc_too(tmp_path: Path, up: FaultyUpstream) -> None:
    async with otlp_grpc_receiver() as receiver:
        tracing = {
            "sample_ratio": 1,
            "exporter": "otlp",
            "protocol": "grpc",
            "endpoint": receiver.url,
            "batch": {"schedule_delay": "20ms"},
        }
        config = gateway_yaml(
            tracing=tracing, upstreams={"app": upstream_to(up.url)}, routes=[route("app", "app")]
        )
        async with running_gateway(tmp_path, config) as gw:
            assert await get(port_of(gw), f"traceparent: {SAMPLED}") == 200
            await flushed(gw)
            spans = await receiver.wait_for(2)
    [server] = by_kind(spans, "SERVER")
    [client] = by_kind(spans, "CLIENT")
    assert (server.trace_id, server.parent_span_id) == (TRACE, PARENT)
    assert client.parent_span_id == server.span_id


async def test_the_console_exporter_writes_one_json_span_per_line_like_the_logs(
    tmp_path: Path, up: FaultyUpstream, capfd: pytest.CaptureFixture[str]
) -> None:
    tracing = {"sample_ratio": 1, "exporter": "console", "batch": {"schedule_delay": "20ms"}}
    config = gateway_yaml(
        tracing=tracing, upstreams={"app": upstream_to(up.url)}, routes=[route("app", "app")]
    )
    async with running_gateway(tmp_path, config) as gw:
        assert await get(port_of(gw), f"traceparent: {SAMPLED}") == 200
        await flushed(gw)
    lines = [json.loads(x) for x in capfd.readouterr().out.splitlines() if x.startswith("{")]
    spans = [line for line in lines if line["type"] == "span"]
    assert [list(s)[:3] for s in spans] == [["time", "level", "type"]] * 2
    server, client = sorted(spans, key=lambda s: s["kind"], reverse=True)
    assert (server["kind"], client["kind"]) == ("SERVER", "CLIENT")
    assert {s["trace_id"] for s in spans} == {TRACE}
    assert (server["parent_span_id"], client["parent_span_id"]) == (PARENT, server["span_id"])
    assert server["attributes"]["http.response.status_code"] == 200
    assert server["resource"]["service.name"] == "gateway"


async def test_a_reload_applies_a_changed_tracing_section(
    tmp_path: Path, receiver: OtlpReceiver, up: FaultyUpstream
) -> None:
    off = gateway_yaml(upstreams={"app": upstream_to(up.url)}, routes=[route("app", "app")])
    async with running_gateway(tmp_path, off) as gw:
        assert await get(port_of(gw), f"traceparent: {SAMPLED}") == 200
        assert header(up, "traceparent") == [SAMPLED]  # off: untouched
        write_config(tmp_path, traced_config(up.url, receiver, sample_ratio=1))
        assert (await gw.reload())["ok"]
        first = gw.snapshot.tracer
        assert first is not None
        assert await get(port_of(gw), path="/api/x") == 200
        await flushed(gw)
        await receiver.wait_for(2)
        # an unchanged section keeps its tracer (and queue) across a reload
        assert (await gw.reload())["ok"]
        assert gw.snapshot.tracer is first
        # a new ratio applies at once
        write_config(tmp_path, traced_config(up.url, receiver, sample_ratio=0))
        assert (await gw.reload())["ok"]
        assert gw.snapshot.tracer is not first
        assert await get(port_of(gw), path="/api/y") == 200
        [sent] = header(up, "traceparent")
        parsed = parse_traceparent(sent)
        assert parsed is not None
        assert parsed[2] is False
        # and turning it off passes headers through again
        write_config(tmp_path, off)
        assert (await gw.reload())["ok"]
        assert gw.snapshot.tracer is None
        assert await get(port_of(gw), f"traceparent: {UNSAMPLED}") == 200
        assert header(up, "traceparent") == [UNSAMPLED]


async def test_shutdown_with_a_hung_collector_waits_about_one_export_timeout_not_one_per_batch(
    tmp_path: Path, receiver: OtlpReceiver, up: FaultyUpstream
) -> None:
    receiver.mode = "hang"  # every export waits out its 1 s timeout
    requests = 12  # 24 spans: six batches of four, six seconds if each were tried at shutdown
    async with running_gateway(tmp_path, collector_config(up, receiver.url, 64, 4)) as gw:
        for _ in range(requests):
            assert await get(port_of(gw)) == 200
        loop = asyncio.get_running_loop()
        stopping = loop.time()
    stopped = loop.time() - stopping
    assert stopped < 4.0
    await async_wait_until(lambda: accounted(gw) == 2 * requests)
    assert span_counts(gw)[0] == 0
    assert shutdown_drops(gw) > 0
