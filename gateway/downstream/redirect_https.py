"""A listener's `redirect_https: {port}` (SPEC §5.8): plain HTTP answered with 308 to HTTPS.

The connection sends every request on such a listener to one route of its own (built with the
snapshot, `gateway.runtime.snapshot.https_redirect_route`) whose terminal is `HttpsRedirect`,
except those under `/.well-known/acme-challenge/`, which are routed as usual so an ACME client
can answer its HTTP-01 challenge on port 80.  Being a route, it is counted, logged and traced
like any other.

The Location is `https://<host>[:<port>]<path>[?<query>]`: the request's normalized Host name
(gateway.http.host refused an invalid one with 400 before this runs; a request without one —
HTTP/1.0, or an empty Host — is 400 too, never a redirect to a guessed host), its port dropped
and replaced by the configured one (left out when it is 443), and the normalized path and the
query encoded by gateway.http.location.  308 keeps the method and body, so a POST sent to the
plain port is repeated, as sent, over TLS.
"""

from __future__ import annotations

from typing import Final, final

from gateway.errors import BadRequest
from gateway.http.location import host_only, location_path, location_query, with_port
from gateway.http.messages import Response
from gateway.observability.instruments import CounterChild
from gateway.pipeline import RequestContext

#: routed as usual on a redirecting listener (RFC 8555 §8.3: HTTP-01 is served on port 80)
ACME_CHALLENGE: Final = "/.well-known/acme-challenge/"


@final
class HttpsRedirect:
    """The terminal of a listener's redirect route."""

    __slots__ = ("_no_host", "_port", "_redirected")

    def __init__(self, port: int, redirected: CounterChild, no_host: CounterChild) -> None:
        self._port = port
        self._redirected = redirected
        self._no_host = no_host

    async def __call__(self, ctx: RequestContext) -> Response:
        head = ctx.head
        host = head.host
        if not host:
            self._no_host.inc()
            ctx.outcome("redirect_https", "no_host")
            raise BadRequest("the request has no Host to redirect to")
        authority = with_port(host_only(host), self._port, 443)
        location = f"https://{authority}{location_path(head.path)}"
        if head.query:
            location += f"?{location_query(head.query)}"
        self._redirected.inc()
        ctx.outcome("redirect_https", "redirected")
        return Response(308, [(b"Location", location.encode("ascii"))])
