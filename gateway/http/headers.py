"""Header rules of the data plane (SPEC §3): hop-by-hop names, headers the gateway owns, and the
serialisation helpers shared by the server and upstream protocols.

Headers travel as ``(name, value)`` byte pairs exactly as received; names are compared in lower
case but never re-encoded on the wire.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Final

#: removed both ways whatever the Connection header says (RFC 9110 §7.6.1 and SPEC §3)
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

#: only the mtls stage may set these; a client's copies are always dropped
CLIENT_CERT_HEADERS: Final = frozenset(
    {b"client-cert", b"client-cert-chain", b"x-forwarded-client-cert"}
)

#: who an api_key or basic_auth stage authenticated, as the upstream is told (SPEC §5.8).  The
#: gateway is its only author: a client's copy is dropped on every route and from every peer,
#: trusted proxies included, so an upstream that believes it is never told a name the client
#: chose, whether or not the route authenticates
CONSUMER_HEADERS: Final = frozenset({b"x-consumer"})

#: the gateway sets these itself on the way upstream; a client's copies never pass as they are
GATEWAY_SET_REQUEST: Final = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"}
)

#: Connection tokens that name no header to remove on arrival: options, hop-by-hop names that are
#: dropped anyway, and names the client may not remove (framing and routing are the gateway's)
NOT_NAMED_BY_CONNECTION: Final = HOP_BY_HOP | frozenset(
    {b"close", b"keep-alive", b"host", b"content-length"}
)

#: headers some framework or proxy believes about the client's address, scheme, port, host,
#: URL, method or authenticated identity (X-Original-URL re-routes in IIS and Symfony,
#: X-HTTP-Method-Override turns a POST into a DELETE in Rails and Express, X-Forwarded-User is
#: who oauth2-proxy logged in): kept from `trusted_proxies`, dropped from anyone else, so a
#: client cannot claim another address or identity, or reach a path or method routing refused
CLIENT_CLAIMS: Final = frozenset(
    {
        b"x-real-ip",
        b"true-client-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-original-forwarded-for",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-server",
        b"x-forwarded-scheme",
        b"x-forwarded-ssl",
        b"x-url-scheme",
        b"front-end-https",
        b"x-original-url",
        b"x-original-uri",
        b"x-rewrite-url",
        b"x-original-host",
        b"x-host",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-original-method",
        b"client-ip",
        b"x-forwarded",
        b"forwarded-for",
        b"x-proxyuser-ip",
        b"x-remote-ip",
        b"x-remote-addr",
        b"x-originating-ip",
        b"x-forwarded-protocol",
        b"x-scheme",
        b"x-forwarded-uri",
        b"x-envoy-original-path",
        b"x-envoy-external-address",
        b"x-arr-ssl",
        # identities an authenticating proxy asserts (oauth2-proxy, IIS ARR, TLS terminators)
        b"remote-user",
        b"x-remote-user",
        b"x-forwarded-user",
        b"x-forwarded-email",
        b"x-auth-request-user",
        b"x-auth-request-email",
        b"x-authenticated-user",
        b"x-arr-clientcert",
        b"ssl-client-cert",
        b"x-ssl-client-cert",
        b"x-ssl-client-verify",
        b"x-ssl-client-s-dn",
        b"x-client-cert",
        b"x-forwarded-tls-client-cert",
        b"x-forwarded-tls-client-cert-info",
    }
)

#: dropped from requests before they go upstream (framing is re-done, Expect is answered here;
#: Forwarded is re-written like X-Forwarded-For; "Proxy" is httpoxy: CGI turns it into
#: HTTP_PROXY, the variable HTTP clients read their proxy from)
REQUEST_DROP: Final = (
    HOP_BY_HOP
    | CLIENT_CERT_HEADERS
    | CONSUMER_HEADERS
    | GATEWAY_SET_REQUEST
    | frozenset({b"content-length", b"expect", b"host", b"forwarded", b"proxy"})
)

#: dropped from responses before they go downstream (framing is re-done by the server protocol)
RESPONSE_DROP: Final = HOP_BY_HOP | frozenset({b"content-length"})


#: whole families of CLIENT_CLAIMS, by prefix: the identity and address headers of
#: authenticating proxies (oauth2-proxy, Kubernetes' front proxy, cloud load balancers, TLS
#: terminators) come in sets, and any member may be believed; X-Forwarded-* except the three the
#: gateway sets (those are always replaced)
CLAIM_PREFIXES: Final = (
    b"x-forwarded-",
    b"x-auth-request-",
    b"x-remote-",
    b"impersonate-",
    b"x-ssl-",
    b"ssl-client-",
    b"x-client-cert",
    b"x-client-dn",
    b"x-client-verify",
    b"x-tls-client-",
    b"x-amzn-oidc-",
    b"x-ms-client-principal",
    b"x-goog-authenticated-",
    b"x-goog-iap-",
    b"cf-access-",
    b"cf-connecting-",
    b"wl-proxy-",
    b"x-consumer-",
    b"x-webauth-",
)

#: `name_class` bits: how a request header is treated on the way upstream
DROP: Final = 1  # always: hop-by-hop, framing, gateway-set, client certs, X-Consumer, Proxy-*
DROP_UNTRUSTED: Final = 2  # from a peer not in trusted_proxies: CLIENT_CLAIMS and their families
UNDERSCORE: Final = 4  # a "_" in the name (dropped unless the route allows them)
TRACE: Final = 8  # W3C trace context: replaced by the gateway's own when tracing is on
PARSED: Final = 16  # read by the connection while parsing (PARSED_NAMES)

#: which of PARSED_NAMES a name is, in its class's bits above PARSED_SHIFT (class >>
#: PARSED_SHIFT): the connection reads a header by this number, without lowering its name and
#: comparing it with each of the names in turn (~0.3k instructions a request, callgrind)
PARSED_SHIFT: Final = 8
READ_HOST: Final = 1
READ_CONTENT_LENGTH: Final = 2
READ_TRANSFER_ENCODING: Final = 3
READ_CONNECTION: Final = 4
READ_PROXY_CONNECTION: Final = 5
READ_EXPECT: Final = 6
READ_UPGRADE: Final = 7
READ_REQUEST_ID: Final = 8
READ_FORWARDED_FOR: Final = 9
READ_FORWARDED: Final = 10
READ_AUTHORIZATION: Final = 11
READ_TRACEPARENT: Final = 12
READ_TRACESTATE: Final = 13

#: the request headers the connection reads while parsing the head (framing, Host, the values
#: stages and tracing read without a scan), by lower-case name: their class carries PARSED and
#: the name's READ_* number
PARSED_NAMES: Final[dict[bytes, int]] = {
    b"host": READ_HOST,
    b"content-length": READ_CONTENT_LENGTH,
    b"transfer-encoding": READ_TRANSFER_ENCODING,
    b"connection": READ_CONNECTION,
    b"proxy-connection": READ_PROXY_CONNECTION,
    b"expect": READ_EXPECT,
    b"upgrade": READ_UPGRADE,
    b"x-request-id": READ_REQUEST_ID,
    b"x-forwarded-for": READ_FORWARDED_FOR,
    b"forwarded": READ_FORWARDED,
    b"authorization": READ_AUTHORIZATION,
    b"traceparent": READ_TRACEPARENT,
    b"tracestate": READ_TRACESTATE,
}

#: the trace context headers (W3C Trace Context)
TRACE_HEADERS: Final = frozenset({b"traceparent", b"tracestate"})

#: names classified so far; clients choose names, so it is emptied when it grows past this
_CLASS_CACHE_SIZE: Final = 4096
#: name -> its `name_class` bits (Final: compiled code reads it without a module lookup)
NAME_CLASSES: Final[dict[bytes, int]] = {}
#: a name as a client spelled it -> its `name_class` bits: the connection classes each request
#: header by it, without lowering the name first (`received_name_class`)
RECEIVED_CLASSES: Final[dict[bytes, int]] = {}


def name_class(low: bytes) -> int:
    """The DROP/DROP_UNTRUSTED/UNDERSCORE/TRACE/PARSED bits of a lower-case header name (and
    above PARSED_SHIFT, which name the connection reads it as),
    remembered per name (a keep-alive client repeats its names).  The connection classes each
    request header once, while parsing (`RequestHead.classes`).  A name is judged with "_" read
    as "-", as CGI/WSGI upstreams read it: X_Forwarded_For is dropped like X-Forwarded-For,
    whatever the route allows (but only the exact spelling is PARSED)."""
    cached = NAME_CLASSES.get(low)
    if cached is not None:
        return cached
    folded = low.replace(b"_", b"-")
    flags = UNDERSCORE if folded != low else 0
    read = PARSED_NAMES.get(low)
    if read is not None:
        flags |= PARSED | read << PARSED_SHIFT
    if folded in REQUEST_DROP or folded.startswith(b"proxy-"):
        flags |= DROP
    elif folded in CLIENT_CLAIMS or folded.startswith(CLAIM_PREFIXES):
        flags |= DROP_UNTRUSTED
    elif low in TRACE_HEADERS:
        flags |= TRACE
    if len(NAME_CLASSES) >= _CLASS_CACHE_SIZE:
        NAME_CLASSES.clear()
    NAME_CLASSES[low] = flags
    return flags


def received_name_class(name: bytes) -> int:
    """`name_class` of a header name as received (any case), remembered per spelling: a
    keep-alive client repeats its names spelled the same, so a request's headers are classed
    without a lower-case copy of each name (a method call and a new object each)."""
    cached = RECEIVED_CLASSES.get(name)
    if cached is not None:
        return cached
    flags = name_class(name.lower())
    if len(RECEIVED_CLASSES) >= _CLASS_CACHE_SIZE:
        RECEIVED_CLASSES.clear()
    RECEIVED_CLASSES[name] = flags
    return flags


_TOKEN_CHARS: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def connection_tokens(value: bytes) -> set[bytes]:
    """The lower-case header names listed in a Connection header value."""
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def is_token(value: bytes) -> bool:
    return bool(value) and all(c in _TOKEN_CHARS for c in value)


class HttpDate:
    """The IMF-fixdate for the Date header, formatted at most once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode("ascii")
        return self._value


http_date: Final = HttpDate()

STATUS_REASONS: Final[dict[int, bytes]] = {
    100: b"Continue",
    101: b"Switching Protocols",
    103: b"Early Hints",
    200: b"OK",
    201: b"Created",
    202: b"Accepted",
    204: b"No Content",
    206: b"Partial Content",
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    304: b"Not Modified",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Payload Too Large",
    422: b"Unprocessable Content",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


#: the status lines of the statuses we know, built once
STATUS_LINES: Final[dict[int, bytes]] = {
    status: b"HTTP/1.1 %d %b\r\n" % (status, reason) for status, reason in STATUS_REASONS.items()
}


def status_line(status: int, reason: bytes | None = None) -> bytes:
    """`HTTP/1.1 <status> <reason>` and its CRLF; the standard reason unless one is given."""
    if not reason:
        line = STATUS_LINES.get(status)
        if line is not None:
            return line
        reason = b"Unknown"
    return b"HTTP/1.1 %d %b\r\n" % (status, reason)
