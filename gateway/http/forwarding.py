"""The request head as it goes upstream (SPEC §3).

Client headers are forwarded byte for byte, less hop-by-hop headers, the headers the client's
Connection header names (except Host and Content-Length, which stay the gateway's), client
certificate headers, and the headers the gateway sets itself — X-Forwarded-For/-Proto/-Host and
X-Request-Id — which are then added from what the gateway knows, so naming them in Connection
can neither remove nor spoof them.  The body is re-framed: Content-Length when the whole body is
known, else chunked; trailers never pass.
"""

from __future__ import annotations

from typing import Final

from gateway.http.headers import CONNECTION_PROTECTED, REQUEST_DROP
from gateway.pipeline import RequestContext

_CRLF: Final = b"\r\n"


def upstream_path(path: str, strip_prefix: str | None) -> str:
    """The routed path with `strip_prefix` removed on a segment boundary."""
    if strip_prefix and strip_prefix != "/" and path.startswith(strip_prefix):
        rest = path[len(strip_prefix) :]
        if not rest:
            return "/"
        if rest[0] == "/":
            return rest
    return path


def build_request_head(
    ctx: RequestContext,
    path: str,
    *,
    content_length: int | None,
    chunked: bool,
    upgrade: bool = False,
    default_host: bytes = b"",
) -> bytes:
    head = ctx.head
    target = path + "?" + head.query if head.query else path
    parts = [head.method.encode("ascii"), b" ", target.encode("ascii"), b" HTTP/1.1\r\n"]
    named = head.connection_tokens
    if named:
        named = named - CONNECTION_PROTECTED
    for name, value in head.headers:
        low = name.lower()
        if low in REQUEST_DROP or (named and low in named):
            continue
        parts += (name, b": ", value, _CRLF)
    host = head.host
    if host is not None:
        parts += (b"Host: ", host, b"\r\nX-Forwarded-Host: ", host, _CRLF)
    elif default_host:
        # an HTTP/1.0 client sent no Host; HTTP/1.1 upstreams require one
        parts += (b"Host: ", default_host, _CRLF)
    client = ctx.client_ip.encode("ascii")
    previous = head.x_forwarded_for
    if previous is not None and ctx.trusted_peer:
        parts += (b"X-Forwarded-For: ", previous, b", ", client, _CRLF)
    else:
        parts += (b"X-Forwarded-For: ", client, _CRLF)
    parts += (
        b"X-Forwarded-Proto: ",
        ctx.scheme.encode("ascii"),
        b"\r\nX-Request-Id: ",
        ctx.request_id,
        _CRLF,
    )
    if upgrade and head.upgrade is not None:
        parts += (b"Connection: Upgrade\r\nUpgrade: ", head.upgrade, _CRLF)
    if content_length is not None:
        parts += (b"Content-Length: ", str(content_length).encode("ascii"), _CRLF)
    elif chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    parts.append(_CRLF)
    return b"".join(parts)
