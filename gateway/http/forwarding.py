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
from gateway.http.messages import RequestHead

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


def upstream_target(head: RequestHead, strip_prefix: str | None) -> bytes:
    """The request-target sent upstream: as received when it was already normal and nothing is
    stripped (the common case, no re-encoding), else rebuilt from the normalized path."""
    if head.plain_target and (not strip_prefix or strip_prefix == "/"):
        return head.target
    path = upstream_path(head.path, strip_prefix)
    return (path + "?" + head.query if head.query else path).encode("ascii")


def build_request_head(
    head: RequestHead,
    target: bytes,
    *,
    client: bytes,
    trusted_peer: bool,
    scheme: bytes,
    request_id: bytes,
    content_length: int | None,
    chunked: bool,
    upgrade: bool = False,
    default_host: bytes = b"",
) -> bytes:
    parts = [head.raw_method, b" ", target, b" HTTP/1.1\r\n"]
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
        parts += (b"Host: ", host, b"\r\nX-Forwarded-Host: ", host, b"\r\nX-Forwarded-For: ")
    elif default_host:
        # an HTTP/1.0 client sent no Host; HTTP/1.1 upstreams require one
        parts += (b"Host: ", default_host, b"\r\nX-Forwarded-For: ")
    else:
        parts.append(b"X-Forwarded-For: ")
    previous = head.x_forwarded_for
    if previous is not None and trusted_peer:
        parts += (previous, b", ")
    parts += (client, b"\r\nX-Forwarded-Proto: ", scheme, b"\r\nX-Request-Id: ", request_id, _CRLF)
    if upgrade and head.upgrade is not None:
        parts += (b"Connection: Upgrade\r\nUpgrade: ", head.upgrade, _CRLF)
    if content_length is not None:
        parts += (b"Content-Length: %d\r\n" % content_length,)
    elif chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    parts.append(_CRLF)
    return b"".join(parts)
