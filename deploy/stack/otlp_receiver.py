"""The local stack's trace collector: an OTLP/HTTP receiver that writes every span it receives
as one JSON line, where a person can `tail -f` it and a test can poll it.

Run: python -m deploy.stack.otlp_receiver --port 4318 --out spans.jsonl

`POST /v1/traces` takes a protobuf `ExportTraceServiceRequest` (what the gateway's exporter
sends), appends its spans to `--out` and answers 200 with an empty `ExportTraceServiceResponse`;
a body that does not decode is a 400 and nothing is written. `GET /healthz` answers 200.
Binds 127.0.0.1 unless `--host` says otherwise.

Each line: trace_id, span_id, parent_span_id (hex), name, kind (SERVER, CLIENT …), service
(the resource's service.name), start/end in unix nanoseconds, error, attributes, events.

Decoding uses opentelemetry-proto, the protocol's own messages. The gateway itself never needs
it (it encodes OTLP itself), so it is a dependency of the test extra that `make setup` installs,
which is also what `make stack` runs with.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from aiohttp import web
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

_EMPTY_RESPONSE = ExportTraceServiceResponse().SerializeToString()
_KINDS = {
    Span.SPAN_KIND_INTERNAL: "INTERNAL",
    Span.SPAN_KIND_SERVER: "SERVER",
    Span.SPAN_KIND_CLIENT: "CLIENT",
    Span.SPAN_KIND_PRODUCER: "PRODUCER",
    Span.SPAN_KIND_CONSUMER: "CONSUMER",
}


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    if which == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, which)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


def span_lines(message: ExportTraceServiceRequest) -> list[str]:
    """One JSON line (newline included) per span of an export."""
    lines = []
    for resource_spans in message.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                record = {
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "name": span.name,
                    "kind": _KINDS.get(span.kind, str(span.kind)),
                    "service": resource.get("service.name", ""),
                    "start_time_unix_nano": span.start_time_unix_nano,
                    "end_time_unix_nano": span.end_time_unix_nano,
                    "error": span.status.code == Status.STATUS_CODE_ERROR,
                    "attributes": _attributes(span.attributes),
                    "events": [
                        {"name": event.name, "attributes": _attributes(event.attributes)}
                        for event in span.events
                    ],
                }
                lines.append(json.dumps(record, sort_keys=True) + "\n")
    return lines


class Receiver:
    def __init__(self, out: Path) -> None:
        self.out = out

    def write(self, lines: list[str]) -> None:
        # one write of whole lines on an O_APPEND descriptor: a reader polling the file never
        # sees half of an export interleaved with another
        if not lines:
            return
        fd = os.open(self.out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, "".join(lines).encode())
        finally:
            os.close(fd)

    async def _export(self, request: web.Request) -> web.StreamResponse:
        message = ExportTraceServiceRequest()
        try:
            message.ParseFromString(await request.read())
        except DecodeError:
            return web.Response(status=400, text="not an OTLP ExportTraceServiceRequest\n")
        self.write(span_lines(message))
        return web.Response(body=_EMPTY_RESPONSE, content_type="application/x-protobuf")

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok\n")

    def app(self) -> web.Application:
        # an export batch of 512 spans is well under a megabyte; leave room for bigger ones
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._export)
        app.router.add_get("/healthz", self._health)
        return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OTLP/HTTP receiver writing spans as JSON lines")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    args.out.touch()
    web.run_app(Receiver(args.out).app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
