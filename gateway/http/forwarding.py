"""The request head as it goes upstream (SPEC §3).

Client headers are forwarded byte for byte, less hop-by-hop headers and every "Proxy-*" (the
headers the client's Connection header names are gone already: the server protocol removes them
on arrival, before any stage, so a header a stage sets is never one a client can remove), client
certificate headers, names containing "_" (unless the route allows them: a
CGI/WSGI upstream reads X_User_Id as X-User-Id), the client-address and URL/method-override
headers of `CLIENT_CLAIMS` from a peer not in `trusted_proxies`, and the headers the gateway
sets itself — X-Forwarded-For/-Proto/-Host, X-Request-Id, Forwarded (only when the client sent
one: from a trusted peer our hop is appended, from anyone else it is replaced) — which are then
added from what the gateway knows, so naming them in Connection can neither remove nor spoof
them.  With tracing on, `traceparent`/`tracestate` are replaced by the try's own (added by the
proxy per try); with it off they pass untouched.  Host is the normalized one
(gateway.http.host).  The body is re-framed: Content-Length when the whole body is known, else
chunked; trailers never pass.
"""

from __future__ import annotations

from typing import Final

from gateway.http.headers import (
    DROP,
    DROP_UNTRUSTED,
    TRACE,
    UNDERSCORE,
)
from gateway.http.messages import RequestHead

_COLON: Final = 0x3A


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


def rewritten_target(head: RequestHead, path: str) -> bytes:
    """The request-target for a rewrite stage's `path`, with the query as it is now."""
    query = head.query
    return (path + "?" + query if query else path).encode("latin-1")


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
    extra: list[tuple[bytes, bytes]] | None = None,
    forward_underscores: bool = False,
    trace_lines: bytes = b"",
    upstream_host: bytes | None = None,
) -> bytes:
    """The head as it goes upstream.  `trace_lines` (RequestTrace.first_try_lines), when the
    request is traced, replace the trace headers the client sent and end the head, blank line
    included: the first try's head is then one copy, and a later try's differs only in its
    last bytes (RequestTrace.try_head).

    `upstream_host` is a rewrite stage's Host, sent instead of the client's (b"": none here,
    the proxy adds each try's endpoint with `with_host`); X-Forwarded-Host and Forwarded keep
    naming the client's."""
    # bytes %-formatting with %b/%d compiles to one sized copy: cheaper than joining a list
    dropped = DROP
    if not trusted_peer:
        dropped |= DROP_UNTRUSTED
    if not forward_underscores:
        dropped |= UNDERSCORE
    if trace_lines:
        # each try carries the gateway's own traceparent (and the tracestate it read)
        dropped |= TRACE
    else:
        trace_lines = b"\r\n"
    lines: list[bytes] = []
    headers = head.headers
    # what each name is (headers.name_class), worked out by the connection while parsing
    classes = head.header_classes()
    for i in range(len(headers)):
        if classes[i] & dropped:
            continue
        name, value = headers[i]
        lines.append(b"%b: %b\r\n" % (name, value))
    if extra:
        for name, value in extra:
            lines.append(b"%b: %b\r\n" % (name, value))
    block = b"".join(lines) if lines else b""
    host = head.host
    if upstream_host is not None:
        hosts = _rewritten_host(upstream_host, host)
    elif host is not None:
        hosts = b"Host: %b\r\nX-Forwarded-Host: %b\r\n" % (host, host)
    elif default_host:
        # an HTTP/1.0 client sent no Host; HTTP/1.1 upstreams require one
        hosts = b"Host: %b\r\n" % default_host
    else:
        hosts = b""
    previous = head.x_forwarded_for
    if previous is not None and trusted_peer:
        forwarded_for = b"%b, %b" % (previous, client)
    else:
        forwarded_for = client
    forwarded = head.forwarded
    if forwarded is not None:
        hosts += _forwarded(forwarded if trusted_peer else None, client, head.host, scheme)
    if upgrade and head.upgrade is not None:
        hosts += b"Connection: Upgrade\r\nUpgrade: %b\r\n" % head.upgrade
    if content_length is not None:
        framing = b"Content-Length: %d\r\n" % content_length
    elif chunked:
        framing = b"Transfer-Encoding: chunked\r\n"
    else:
        framing = b""
    return (
        b"%b %b HTTP/1.1\r\n%b%bX-Forwarded-For: %b\r\nX-Forwarded-Proto: %b\r\n"
        b"X-Request-Id: %b\r\n%b%b"
        % (
            head.raw_method,
            target,
            block,
            hosts,
            forwarded_for,
            scheme,
            request_id,
            framing,
            trace_lines,
        )
    )


def _rewritten_host(upstream_host: bytes, client_host: bytes | None) -> bytes:
    """The Host line a rewrite stage asked for (none for b""), and X-Forwarded-Host naming the
    host the client asked for, as without a rewrite."""
    line = b"Host: %b\r\n" % upstream_host if upstream_host else b""
    if client_host is not None:
        line += b"X-Forwarded-Host: %b\r\n" % client_host
    return line


def with_host(request: bytes, host: bytes) -> bytes:
    """`request` (a head from `build_request_head` without a Host line) with `Host: host` right
    after its request line: each try of a `host: endpoint` rewrite names its own endpoint."""
    end = request.index(b"\r\n") + 2
    return b"%bHost: %b\r\n%b" % (request[:end], host, request[end:])


def _forwarded(previous: bytes | None, client: bytes, host: bytes | None, scheme: bytes) -> bytes:
    """The Forwarded header line (RFC 7239) with this hop appended to what a trusted peer sent."""
    # an IPv6 address and a host with a port are not tokens: they go in a quoted-string
    node = b'"[%b]"' % client if _COLON in client else client
    element = b"for=%b;proto=%b" % (node, scheme)
    if host:
        element += b';host="%b"' % host if _COLON in host else b";host=%b" % host
    if previous:
        return b"Forwarded: %b, %b\r\n" % (previous, element)
    return b"Forwarded: %b\r\n" % element
