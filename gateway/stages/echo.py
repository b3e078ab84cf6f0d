"""The built-in `internal:echo` upstream: answers with the request it would have forwarded.

It builds the same upstream request head the proxy would send, so what it shows — headers after
hop-by-hop removal, X-Forwarded-*, X-Request-Id, the stripped or rewritten path and Host — is
exactly what a real upstream would receive.  The body is read (within the route's limit) and
echoed back as text.
"""

from __future__ import annotations

import json
from typing import final

from gateway.http.forwarding import (
    build_request_head,
    rewritten_target,
    upstream_path,
    upstream_target,
)
from gateway.http.messages import Response
from gateway.pipeline import RequestContext

#: the longest body echoed back verbatim; larger ones are counted, not copied
_ECHO_BODY_LIMIT = 64 * 1024


@final
class EchoHandler:
    __slots__ = ("strip_prefix",)

    def __init__(self, *, strip_prefix: str | None) -> None:
        self.strip_prefix = strip_prefix

    async def __call__(self, ctx: RequestContext) -> Response:
        ctx.upstream = "internal:echo"
        ctx.endpoint = "internal:echo"
        ctx.attempts += 1
        size = 0
        kept: list[bytes] = []
        if ctx.body is not None:
            while chunk := await ctx.body.read():
                if size < _ECHO_BODY_LIMIT:
                    kept.append(chunk)
                size += len(chunk)
        path = upstream_path(ctx.head.path, self.strip_prefix)
        target = upstream_target(ctx.head, self.strip_prefix)
        host: bytes | None = None
        rewrite = ctx.rewrite
        if rewrite is not None:
            if rewrite.path is not None:
                path = rewrite.path
                target = rewritten_target(ctx.head, path)
            # `host: endpoint` has no endpoint here: the client's Host is shown
            host = rewrite.host
        raw = build_request_head(
            ctx.head,
            target,
            client=ctx.peer.ip_bytes,
            trusted_peer=ctx.peer.trusted,
            scheme=ctx.peer.scheme_bytes,
            request_id=ctx.request_id,
            content_length=size if ctx.body is not None else None,
            chunked=False,
            extra=ctx.upstream_headers,
            forward_underscores=ctx.route.forward_underscores,
            upstream_host=host,
        )
        lines = raw.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, _, value = line.partition(": ")
            low = name.lower()
            headers[low] = f"{headers[low]}, {value}" if low in headers else value
        text = b"".join(kept)[:_ECHO_BODY_LIMIT].decode("utf-8", "replace")
        payload = {
            "method": ctx.head.method,
            "path": path,
            "query": ctx.head.query,
            "headers": headers,
            "body": text,
            "body_bytes": size,
            "route": ctx.route.name,
        }
        body = json.dumps(payload, indent=2).encode() + b"\n"
        return Response(200, [(b"Content-Type", b"application/json")], body=body)
