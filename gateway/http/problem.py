"""The one shape of every error the gateway itself returns: RFC 9457 problem+json (SPEC §4)."""

from __future__ import annotations

import json

from gateway.errors import GatewayError
from gateway.http.headers import http_date
from gateway.http.messages import Response

CONTENT_TYPE = b"application/problem+json"


def problem_body(error: GatewayError, request_id: str) -> bytes:
    return json.dumps(
        {
            "type": f"urn:gateway:problem:{error.code}",
            "title": error.title,
            "status": error.status,
            "detail": error.detail,
            "code": error.code,
            "request_id": request_id,
        },
        separators=(",", ":"),
    ).encode()


def problem_response(error: GatewayError, request_id: bytes) -> Response:
    headers = [(b"Content-Type", CONTENT_TYPE), (b"Date", http_date())]
    headers += [(n.encode("latin-1"), v.encode("latin-1")) for n, v in error.headers]
    return Response(error.status, headers, body=problem_body(error, request_id.decode("latin-1")))
