"""Stages and the request context they share.

A route's pipeline is composed once per snapshot into a chain of `_Link` objects (no closures
built per request): the first stage is called with the context and the rest of the chain as
`call_next`; the terminal handler (proxy or the built-in echo) ends it.  Stages run like an onion:
request-side work in pipeline order, response-side work in reverse.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol, final

from gateway.errors import GatewayError
from gateway.http.messages import RequestBody, RequestHead, Response

if TYPE_CHECKING:
    from gateway.observability.request_trace import RequestTrace
    from gateway.runtime.snapshot import Route, Snapshot
    from gateway.tls import ClientCertificate
    from gateway.upstream.upstream import Endpoint, Upstream

Next = Callable[["RequestContext"], Awaitable[Response]]


class Stage(Protocol):
    """A coroutine function, mostly; a stage with nothing to do after the rest of the pipeline
    may instead return `call_next(ctx)` itself (the jwt stage, for a cached token), sparing the
    request a coroutine frame.  Either way callers only ever `await stage(ctx, call_next)`."""

    def __call__(self, ctx: RequestContext, call_next: Next) -> Awaitable[Response]: ...


@final
class Peer:
    """The client end of one downstream connection, shared by every request on it."""

    __slots__ = (
        "address",
        "address_read",
        "client_cert",
        "client_sans",
        "ip",
        "ip_bytes",
        "listener",
        "scheme",
        "scheme_bytes",
        "trusted",
    )

    def __init__(self, ip: str, *, trusted: bool, scheme: str, listener: str) -> None:
        self.ip = ip
        #: as it goes into X-Forwarded-For, encoded once per connection
        self.ip_bytes = ip.encode("ascii")
        #: X-Forwarded-For and X-Request-Id from this peer are believed (trusted_proxies)
        self.trusted = trusted
        self.scheme = scheme
        self.scheme_bytes = scheme.encode("ascii")
        self.listener = listener
        #: the client certificate verified at the TLS handshake, if any
        self.client_cert: ClientCertificate | None = None
        #: its SAN values
        self.client_sans: tuple[str, ...] | None = None
        #: `ip` as (IPv6, integer) for address rules, read once per connection by the first
        #: stage that needs it (`address_read`): gateway.stages.ip_filter.address_value
        self.address: tuple[bool, int] | None = None
        self.address_read = False


@final
class UpstreamTries:
    """What the stages around the upstream tell each other about its tries: the one typed value
    the retry stage, the idempotency stage and the terminal handler share, each field with one
    writer.

    - `deadline`: written by the retry stage before each try (its `per_try_timeout`) and put
      back after; read by the proxy.  The request's deadline when no retry stage sets one.
    - `written`: tries written to an upstream (any byte of the request may have reached it),
      counted by the proxy before a try's first byte; read by the retry stage (may it send the
      request again?) and the idempotency stage (released, or an unknown outcome?).
    - `last_endpoint`: the endpoint the last try used, written by the proxy; its next try (a
      retry's) avoids it when there is another one.
    - `resend_keyed`: written by an idempotency stage whose upstream de-duplicates by the key it
      accepted; read by the retry stage: a keyed POST or PATCH may be sent again once written.
    """

    __slots__ = ("deadline", "last_endpoint", "resend_keyed", "written")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.written = 0
        self.last_endpoint: Endpoint | None = None
        self.resend_keyed = False


@final
class UpstreamRewrite:
    """How a `rewrite` stage changes the request as it goes upstream (SPEC §5.8); read by the
    route's terminal handler.  One value per stage when only the host changes, one per request
    when the path does.

    - `path`: the path sent instead of the routed one (rewritten, checked and normalized);
      None: as routed, `strip_prefix` applied.  The query joins it only when the head is built,
      so what a later stage does to the query (an api_key stage cuts its key) still holds;
    - `host`: the Host sent instead of the client's (X-Forwarded-Host and Forwarded still name
      the client's); None: the client's;
    - `endpoint_host`: Host is each try's endpoint's `host[:port]` as its URL spells it — known
      only once the balancer picked it, so a retry to another endpoint names that one.
    """

    __slots__ = ("endpoint_host", "host", "path")

    def __init__(
        self, path: str | None, host: bytes | None, *, endpoint_host: bool = False
    ) -> None:
        self.path = path
        self.host = host
        self.endpoint_host = endpoint_host


class ResponseEdit:
    """What a route's first stage does to the route's response, left to the connection that
    runs the pipeline: applied to the response the pipeline returns (`edited`), or to the
    refusal it raises (`refused`: headers added to the GatewayError, which becomes the
    problem+json answer).

    Only a route's *first* stage may leave its edit so (`compose` gives it the stage's
    `outermost` method where it has one): nothing is outside it to see the response before the
    connection does, so the client gets what the stage awaiting the rest of the pipeline would
    have given — and the request is spared that stage's coroutine frame (the cors stage:
    ~1k instructions a request).  Subclasses are final native classes; see cors."""

    def edited(self, response: Response) -> Response:
        raise NotImplementedError

    def refused(self, error: GatewayError) -> None:
        raise NotImplementedError


@final
class RequestContext:
    """Everything one request carries through its pipeline.

    Each field has one writer, named below with its readers:
    - `head`, `body`, `route`, `snapshot`, `peer`, `request_id`, `start`, `deadline`, `target`:
      set here, at the start (`target` is the route's draw), read by everyone;
    - `tries`: the `UpstreamTries` value through which the retry and idempotency stages and the
      proxy tell each other about upstream tries (its fields name their writers);
    - `upstream_head`: the proxy (the head built once, reused by its retries);
    - `upstream`, `endpoint`, `attempts`: the route's terminal handler (proxy or echo), read
      by the access log;
    - `claims`: the jwt stage, read through `gateway.identity` (keys, scopes);
    - `consumer`: the api_key or basic_auth stage (the name its credential belongs to), read
      through `gateway.identity` (`consumer` keys and scopes); a route has at most one of them;
    - `trace`: set here from the downstream connection (None when tracing is off); the proxy
      asks it for each try's trace headers and span, `outcome` adds span events to it;
    - `upstream_headers`, `outcomes`: appended to through `add_upstream_header` and `outcome`,
      each stage adding its own, read by the terminal handler and the access log;
    - `rewrite`: the rewrite stage (upstream Host and path), read by the terminal handler;
    - `edit`: the route's first stage, when it leaves its response edit to the connection
      (`ResponseEdit`), read by the connection once the pipeline returned or raised.
    """

    __slots__ = (
        "attempts",
        "body",
        "claims",
        "consumer",
        "deadline",
        "decisions",
        "edit",
        "endpoint",
        "head",
        "peer",
        "request_id",
        "rewrite",
        "route",
        "snapshot",
        "start",
        "target",
        "trace",
        "tries",
        "upstream",
        "upstream_head",
        "upstream_headers",
    )

    def __init__(
        self,
        head: RequestHead,
        body: RequestBody | None,
        route: Route,
        snapshot: Snapshot,
        peer: Peer,
        request_id: bytes,
        start: float,
        trace: RequestTrace | None = None,
    ) -> None:
        self.head = head
        self.body = body
        self.route = route
        self.snapshot = snapshot
        self.peer = peer
        self.request_id = request_id
        self.start = start
        self.deadline = deadline = start + route.timeout
        #: what the stages around the upstream tell each other about its tries
        self.tries = UpstreamTries(deadline)
        #: filled by the terminal stage for the access log and metrics
        self.upstream: str | None = None
        self.endpoint: str | None = None
        self.attempts = 0
        #: what the stages decided, flat (a stage's name, its decision, the next stage's …),
        #: created on first use: two appends a decision, where a dict cost a hash table per
        #: request for what is read only when the request is logged (`outcomes`)
        self.decisions: list[str] | None = None
        #: the request head as it goes upstream (built once, reused by retries)
        self.upstream_head: bytes | None = None
        #: headers stages add for the upstream that a client can never send itself (they are
        #: in REQUEST_DROP, so the client's copies are gone): Client-Cert, claims …
        self.upstream_headers: list[tuple[bytes, bytes]] | None = None
        #: the upstream this request goes to, drawn once by its route (None on the echo); every
        #: stage and every retry reads the same one
        self.target: Upstream | None = route.draw_upstream()
        #: the verified JWT's claims, set by the jwt stage
        self.claims: dict[str, object] | None = None
        #: who an api_key or basic_auth stage authenticated (never the credential itself)
        self.consumer: str | None = None
        #: its place in a trace (None: tracing off)
        self.trace = trace
        #: set by a rewrite stage: the upstream Host and path differ from the client's
        self.rewrite: UpstreamRewrite | None = None
        #: the route's response edit, left by its first stage to the connection
        self.edit: ResponseEdit | None = None

    def add_upstream_header(self, name: bytes, value: bytes) -> None:
        """A header for the upstream that the client could not have sent (its name is in
        REQUEST_DROP): a certificate, a claim."""
        extra = self.upstream_headers
        if extra is None:
            self.upstream_headers = [(name, value)]
        else:
            extra.append((name, value))

    def outcome(self, stage: str, decision: str) -> None:
        """Record what a stage decided, for the access log and as a span event."""
        decisions = self.decisions
        if decisions is None:
            self.decisions = [stage, decision]
        else:
            decisions.append(stage)
            decisions.append(decision)
        trace = self.trace
        if trace is not None:
            trace.event(stage, decision)

    @property
    def outcomes(self) -> dict[str, str] | None:
        """Stage name -> what it decided (its last decision, should it decide twice); None
        when no stage decided anything."""
        decisions = self.decisions
        if decisions is None:
            return None
        return {decisions[i]: decisions[i + 1] for i in range(0, len(decisions), 2)}


@final
class _Link:
    __slots__ = ("_next", "_stage")

    def __init__(self, stage: Stage, call_next: Next) -> None:
        self._stage = stage
        self._next = call_next

    def __call__(self, ctx: RequestContext) -> Awaitable[Response]:
        return self._stage(ctx, self._next)


def compose(stages: Sequence[Stage], terminal: Next) -> Next:
    """Chain `stages` in order in front of `terminal`.  The first stage is called through its
    `outermost` method when it has one: the same decisions, with its response edit left to the
    connection (`ResponseEdit`)."""
    handler = terminal
    for i in range(len(stages) - 1, -1, -1):
        stage = stages[i]
        if i == 0:
            outermost: Stage | None = getattr(stage, "outermost", None)
            if outermost is not None:
                stage = outermost
        handler = _Link(stage, handler)
    return handler
