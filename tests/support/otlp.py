"""A real OTLP/HTTP trace receiver on 127.0.0.1: it decodes each export with opentelemetry-proto
and keeps the spans, so tests check what a collector would get.

`mode` decides how the next exports are answered: "ok" (200), "fail" (503), or "hang" (no
answer until the test sets `release`, then 503 without keeping its spans: the exporter may have
given up on it already, and a span is only kept when its export is known to have succeeded).
Spans are kept flattened (`ReceivedSpan`): hex ids, attributes and events as plain Python
values, and the resource attributes they came with.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

KINDS = {
    Span.SPAN_KIND_SERVER: "SERVER",
    Span.SPAN_KIND_CLIENT: "CLIENT",
    Span.SPAN_KIND_INTERNAL: "INTERNAL",
}


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    return None if which is None else getattr(value, which)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs if isinstance(kv, KeyValue)}


@dataclass
class ReceivedSpan:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    error: bool
    resource: dict[str, Any] = field(default_factory=dict)
    trace_state: str = ""


class OtlpReceiver:
    def __init__(self) -> None:
        self.mode = "ok"
        self.spans: list[ReceivedSpan] = []
        self.exports = 0
        self.release = asyncio.Event()
        #: set whenever spans arrive (tests await it instead of sleeping)
        self.arrived = asyncio.Event()
        self.server: TestServer | None = None
        #: set by otlp_grpc_receiver
        self.grpc_url = ""
        #: the connection each OTLP/HTTP export came on (a test may close them, as a
        #: collector closes idle keep-alive connections)
        self.transports: list[asyncio.BaseTransport] = []

    @property
    def url(self) -> str:
        if self.grpc_url:
            return self.grpc_url
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}/v1/traces"

    async def _export(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.exports += 1
        if request.transport is not None:
            self.transports.append(request.transport)
        if self.mode == "hang":
            await self.release.wait()
            return web.Response(status=503)
        if self.mode == "fail":
            return web.Response(status=503)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        self.keep(message)
        self.arrived.set()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def keep(self, message: ExportTraceServiceRequest) -> None:
        for resource_spans in message.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            name=span.name,
                            kind=KINDS.get(span.kind, str(span.kind)),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes=_attributes(span.attributes),
                            events=[(e.name, _attributes(e.attributes)) for e in span.events],
                            error=span.status.code == Status.STATUS_CODE_ERROR,
                            resource=resource,
                            trace_state=span.trace_state,
                        )
                    )

    async def wait_for(self, count: int, within: float = 10.0) -> list[ReceivedSpan]:
        """The spans once at least `count` arrived (fails after `within` seconds)."""
        async with asyncio.timeout(within):
            while True:
                self.arrived.clear()  # before the check: no arrival can slip between the two
                if len(self.spans) >= count:
                    return self.spans
                await self.arrived.wait()


@asynccontextmanager
async def otlp_receiver() -> AsyncIterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    app = web.Application()
    app.router.add_post("/v1/traces", receiver._export)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    receiver.server = server
    try:
        yield receiver
    finally:
        receiver.release.set()
        await server.close()


class _GrpcTraceService(TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    async def Export(
        self, request: ExportTraceServiceRequest, context: object
    ) -> ExportTraceServiceResponse:
        self.receiver.exports += 1
        self.receiver.keep(request)
        self.receiver.arrived.set()
        return ExportTraceServiceResponse()


@asynccontextmanager
async def otlp_grpc_receiver() -> AsyncIterator[OtlpReceiver]:
    """The same receiver over OTLP/gRPC (`url` is then the collector's http://host:port)."""
    receiver = OtlpReceiver()
    server = grpc.aio.server()
    add_TraceServiceServicer_to_server(_GrpcTraceService(receiver), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    receiver.grpc_url = f"http://127.0.0.1:{port}"
    try:
        yield receiver
    finally:
        await server.stop(None)
