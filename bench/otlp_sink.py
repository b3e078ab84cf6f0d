"""A live OTLP/HTTP trace receiver for the traced scenarios: the gateway exports to it as it
would to a collector, and it counts what arrives.

Run: python -m bench.otlp_sink PORT
`POST /v1/traces` decodes the protobuf `ExportTraceServiceRequest` (opentelemetry-proto), counts
its spans by their resource's `service.name` and answers 200 with an empty
`ExportTraceServiceResponse`; a body that does not decode is a 400 and counted as `rejected`.
`GET /counts` answers the counts so far as JSON: {"spans": {service: n}, "exports": n,
"rejected": n}.  Binds 127.0.0.1 only.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections import Counter

from aiohttp import web
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

_EMPTY_RESPONSE = ExportTraceServiceResponse().SerializeToString()


class Sink:
    def __init__(self) -> None:
        self.spans: Counter[str] = Counter()
        self.exports = 0
        self.rejected = 0

    def take(self, body: bytes) -> bool:
        """Count the spans of one export; False when it is not an ExportTraceServiceRequest."""
        message = ExportTraceServiceRequest()
        try:
            message.ParseFromString(body)
        except DecodeError:
            self.rejected += 1
            return False
        self.exports += 1
        for resource_spans in message.resource_spans:
            service = "unknown"
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    service = attribute.value.string_value
            self.spans[service] += sum(len(scope.spans) for scope in resource_spans.scope_spans)
        return True

    def counts(self) -> dict[str, object]:
        return {"spans": dict(self.spans), "exports": self.exports, "rejected": self.rejected}

    async def _export(self, request: web.Request) -> web.StreamResponse:
        if not self.take(await request.read()):
            return web.Response(status=400, text="not an ExportTraceServiceRequest")
        return web.Response(body=_EMPTY_RESPONSE, content_type="application/x-protobuf")

    async def _counts(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.counts())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._export)
        app.router.add_get("/counts", self._counts)
        return app


def endpoint(port: int) -> str:
    """The URL the gateway's `tracing.endpoint` names."""
    return f"http://127.0.0.1:{port}/v1/traces"


def counts(port: int) -> dict[str, object]:
    """A running sink's counts (see the module docstring)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/counts", timeout=5) as answer:
        result: dict[str, object] = json.loads(answer.read())
    return result


def spans_of(port: int, service: str) -> int:
    """How many spans the sink on `port` received from `service` (its `service.name`)."""
    spans = counts(port)["spans"]
    assert isinstance(spans, dict)
    return int(spans.get(service, 0))


def main() -> None:
    web.run_app(Sink().app(), host="127.0.0.1", port=int(sys.argv[1]), print=None)


if __name__ == "__main__":
    main()
