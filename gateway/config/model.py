"""The configuration model: frozen dataclasses, one per YAML mapping of SPEC §2.

Values here are already normalized: durations are float seconds, sizes are int bytes, names
are resolved.  The loader (load.py) builds these from raw YAML and reports errors with their
YAML path; nothing here touches the file system or the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Balance = Literal["round_robin", "least_request"]

#: the built-in upstream that answers with the request it received, as JSON
INTERNAL_ECHO = "internal:echo"


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateConfig:
    """A certificate (chain) and its key, as absolute paths; checked when loaded."""

    cert: str
    key: str
    #: the names the certificate serves, from its SANs (filled by the loader)
    names: tuple[str, ...] = ()
    #: its expiry, Unix seconds (filled by the loader)
    not_after: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerTLSConfig:
    #: chosen by SNI; the first is the default
    certificates: tuple[CertificateConfig, ...]
    #: clients MAY present a certificate, verified against this bundle
    client_ca: str | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerConfig:
    name: str
    host: str
    port: int
    tls: ListenerTLSConfig | None = None

    @property
    def socket(self) -> tuple[str, str, int, str, bool]:
        """What needs a restart to change: the name, the address, the TLS version floor (or
        plain HTTP) and whether clients are asked for certificates — OpenSSL fixes the last two
        when a connection starts, before the handshake can switch to the current certificates."""
        tls = self.tls
        floor = tls.min_version if tls is not None else "none"
        return (self.name, self.host, self.port, floor, bool(tls and tls.client_ca))


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 9901
    #: when set, /admin/* requires "Authorization: Bearer <token>"
    token: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    max_header_bytes: int = 32 * 1024
    max_body_bytes: int = 10 * 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 60.0
    max_connections: int = 10_000
    #: connections one client address may hold at once (per worker); 0 = no limit; peers in
    #: `trusted_proxies` are not counted (they carry many clients)
    max_connections_per_client: int = 0
    #: request bodies up to this size are read whole before an upstream connection is taken
    #: (a larger one streams once this much has arrived); 0 = stream at once
    request_buffering: int = 64 * 1024
    #: the slowest a client may send a request body or read a response, in bytes per second,
    #: measured after `min_data_rate_grace`; 0 = no minimum (only the body_timeout gap)
    min_data_rate: int = 1024
    min_data_rate_grace: float = 5.0
    #: a tunnel (WebSocket) through which nothing moved either way for this long is closed
    tunnel_idle_timeout: float = 300.0


UnderscoreAction = Literal["drop", "reject", "allow"]
PathEscape = Literal["percent", "semicolon", "question_mark", "hash"]
PATH_ESCAPES: tuple[PathEscape, ...] = ("percent", "semicolon", "question_mark", "hash")


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpRulesConfig:
    """How request heads that upstreams may read differently are treated (README, "Request
    rules"); top-level `http:`, and a route's `http:` overrides it key by key."""

    #: request header names containing "_" (CGI/WSGI upstreams read X_User_Id as X-User-Id)
    underscores_in_headers: UnderscoreAction = "drop"
    #: ";" in the path (Tomcat and Spring strip ";params", so "/..;/admin" is "/../admin")
    path_semicolons: Literal["reject", "allow"] = "reject"
    #: which of the ambiguous escapes %25, %3B, %3F, %23 the path may contain
    path_escapes: tuple[PathEscape, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownConfig:
    drain_delay: float = 5.0
    timeout: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessLogConfig:
    enabled: bool = True
    sample_ratio: float = 1.0
    always_log_status: int = 500
    exclude_fields: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointConfig:
    url: str
    scheme: Literal["http", "https"]
    host: str
    port: int
    weight: int = 1

    @property
    def address(self) -> str:
        """``host:port`` — the endpoint's name in metrics and the admin API."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamTLSConfig:
    """How https endpoints are verified, and the certificate the gateway presents to them."""

    #: CA bundle the endpoints' certificates are verified against (None = the system's)
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    #: the name verified and sent as SNI (None = each endpoint's host)
    server_name: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheckConfig:
    """Active health checks: GET `path` on every endpoint each `interval`."""

    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 1.0
    #: consecutive passes that make an unhealthy endpoint healthy again
    healthy: int = 2
    #: consecutive failures that make a healthy endpoint unhealthy
    unhealthy: int = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierDetectionConfig:
    """Passive outlier detection: consecutive failed requests eject an endpoint for a while."""

    consecutive_failures: int = 5
    #: the first ejection's length; the n-th consecutive ejection lasts n times as long
    ejection: float = 30.0
    max_ejection: float = 300.0
    max_ejected_percent: int = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    name: str
    endpoints: tuple[EndpointConfig, ...]
    balance: Balance = "round_robin"
    connect_timeout: float = 2.0
    response_header_timeout: float = 15.0
    pool_max_connections: int = 256
    pool_idle_timeout: float = 60.0
    #: how long a request waits for a pooled connection when all are busy (then 503)
    pool_queue_timeout: float = 1.0
    health_check: HealthCheckConfig | None = None
    outlier_detection: OutlierDetectionConfig | None = None
    #: for https endpoints (all of an upstream's endpoints share one scheme)
    tls: UpstreamTLSConfig | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MatchConfig:
    #: lower-case host without port; "*.example.com" for a wildcard; None matches any host
    host: str | None = None
    path: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    #: upper-case method names; None matches any method
    methods: tuple[str, ...] | None = None
    #: lower-case header name -> exact value; all must match
    headers: tuple[tuple[str, str], ...] = ()
    #: path, prefix and regex compared ignoring ASCII case (for upstreams that do the same)
    case_insensitive: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightedUpstream:
    name: str
    weight: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderEdits:
    """Headers set (replacing any of the same name) and removed, names as written."""

    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadersConfig:
    request: HeaderEdits = field(default_factory=HeaderEdits)
    response: HeaderEdits = field(default_factory=HeaderEdits)


@dataclass(frozen=True, slots=True, kw_only=True)
class MtlsConfig:
    """Client-certificate authorization for a route (the handshake already verified the chain)."""

    required: bool = True
    #: globs over the certificate's DNS/URI/e-mail/IP SANs
    allowed_sans: tuple[str, ...] = ()
    #: globs over its RFC 4514 subject
    allowed_subjects: tuple[str, ...] = ()
    forward: Literal["rfc9440", "xfcc", "none"] = "rfc9440"


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtConfig:
    issuer: str | None = None
    audiences: tuple[str, ...] = ()
    #: explicit, never taken from the token; all HMAC or all public-key
    algorithms: tuple[str, ...]
    jwks_file: str | None = None
    jwks_url: str | None = None
    secret: str | None = None
    #: sha256 of the JWKS file's content, so a changed file is a changed stage
    jwks_digest: str = ""
    leeway: float = 30.0
    required_claims: tuple[str, ...] = ()
    #: claim -> header sent upstream
    forward_claims: tuple[tuple[str, str], ...] = ()
    #: how often a jwks_url is fetched again
    jwks_refresh: float = 300.0
    #: verified tokens remembered (never past their exp)
    cache_size: int = 10_000

    def __repr__(self) -> str:
        # the secret must never reach a log line or an error message
        shown = "***" if self.secret else None
        return f"JwtConfig(issuer={self.issuer!r}, algorithms={self.algorithms!r}, secret={shown})"


@dataclass(frozen=True, slots=True, kw_only=True)
class IdempotencyTokenConfig:
    secret: str
    #: a token is valid this many seconds either side of its minting time
    window: float = 300.0
    #: whose token it is: "jwt:<claim>", "mtls:san" or "header:<name>"
    client_id: str

    def __repr__(self) -> str:
        # the secret must never reach a log line or an error message
        return f"IdempotencyTokenConfig(secret=***, client_id={self.client_id!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class IdempotencyConfig:
    header: str = "Idempotency-Key"
    methods: tuple[str, ...] = ("POST", "PATCH")
    required: bool = True
    ttl: float = 86400.0
    store: str = "memory"
    on_store_error: Literal["allow", "deny"] = "deny"
    max_response_bytes: int = 1024 * 1024
    #: records kept per stage (per worker with the memory store), in-flight locks included
    max_keys: int = 100_000
    #: bytes of keys and stored responses kept per stage: 64 responses of the largest size
    #: kept, or 100000 of ~670 bytes; beyond it completed records are evicted oldest first
    max_bytes: int = 64 * 1024 * 1024
    #: whose records these are: "none" (the key alone), "client_ip", "header:<lower-case
    #: name>", "jwt:<claim>" or "mtls:san"; "auto" as written, which the loader resolves per
    #: route to "jwt:sub" after a jwt stage, else "mtls:san" after an mtls stage, else "none"
    scope: str = "auto"
    token: IdempotencyTokenConfig | None = None
    #: the upstream honours the forwarded key itself: a request whose outcome is unknown may
    #: be sent again (its key is released, and a later retry stage may re-send it)
    upstream_deduplicates: bool = False


#: what a rate limit is keyed on: one of these, or several (a composite key)
RateLimitKey = str  # "client_ip" | "route" | "header:<name>" | "jwt:<claim>" | "mtls:san"


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitConfig:
    """A token bucket per key: `rate` tokens every `per` seconds, holding at most `burst`."""

    rate: float
    per: float = 1.0
    burst: int
    key: tuple[RateLimitKey, ...] = ("client_ip",)
    max_keys: int = 100_000
    store: str = "memory"
    on_store_error: Literal["allow", "deny"] = "allow"


@dataclass(frozen=True, slots=True, kw_only=True)
class SlowCallConfig:
    duration: float
    ratio: float


@dataclass(frozen=True, slots=True, kw_only=True)
class FallbackConfig:
    """The response a circuit breaker gives while open, instead of 503 circuit_open."""

    status: int = 503
    body: str = ""
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitBreakerConfig:
    window: float = 10.0
    min_requests: int = 20
    failure_ratio: float = 0.5
    failure_statuses: tuple[int, ...] = (502, 503, 504)
    slow_call: SlowCallConfig | None = None
    open_for: float = 5.0
    max_open_for: float = 60.0
    half_open_requests: int = 3
    fallback: FallbackConfig | None = None


#: failures a retry may follow, besides response statuses
RETRY_FAILURES = ("connect_error", "reset", "timeout")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryConfig:
    #: total tries, the first included
    attempts: int = 2
    #: None = each try may use what is left of the route's timeout
    per_try_timeout: float | None = None
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    #: failure kinds of RETRY_FAILURES
    retry_on: tuple[str, ...] = ("connect_error", "reset")
    retry_statuses: tuple[int, ...] = (502, 503, 504)
    #: retries in flight per upstream may be at most this share of its requests in flight …
    budget_ratio: float = 0.2
    #: … or this many, whichever is more
    budget_min_concurrent: int = 3


#: the config of one stage kind
StageConfig = (
    HeadersConfig
    | RateLimitConfig
    | CircuitBreakerConfig
    | RetryConfig
    | MtlsConfig
    | JwtConfig
    | IdempotencyConfig
)


@dataclass(frozen=True, slots=True, kw_only=True)
class StageSpec:
    """One pipeline entry: its kind, its config and who owns its state.

    `owner` is `middleware:<name>` for a named middleware (one instance shared by every route
    that names it) or `route:<route>:<position>` for an inline stage (the route's own).
    """

    kind: str
    config: StageConfig
    owner: str

    @property
    def label(self) -> str:
        """The owner as metrics and headers name it: the middleware's or the route's name."""
        kind, _, rest = self.owner.partition(":")
        return rest if kind == "middleware" else rest.rpartition(":")[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    name: str
    #: position in the file, used for tie-breaking (regexes in file order)
    index: int
    match: MatchConfig
    #: one entry with weight 1 for `upstream: NAME`, several for a weighted split
    upstreams: tuple[WeightedUpstream, ...]
    strip_prefix: str | None = None
    timeout: float = 30.0
    #: None = the listener-wide `limits.max_body_bytes`
    max_body_bytes: int | None = None
    #: None = `limits.request_buffering`
    request_buffering: int | None = None
    websocket: bool = False
    #: the top-level `http:` rules with this route's overrides applied
    http: HttpRulesConfig = field(default_factory=HttpRulesConfig)
    #: in order; request side runs first to last, response side last to first
    pipeline: tuple[StageSpec, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    listeners: tuple[ListenerConfig, ...]
    admin: AdminConfig = field(default_factory=AdminConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    http: HttpRulesConfig = field(default_factory=HttpRulesConfig)
    #: CIDR strings, validated by the loader
    trusted_proxies: tuple[str, ...] = ()
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    #: named stages, by name
    middlewares: tuple[StageSpec, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    #: absolute path of the file this came from ("" when built from a string)
    source: str = ""
    #: every file it references (certificates, keys, CAs, JWKS), absolute, symlinks kept
    files: tuple[str, ...] = ()
    #: first 12 hex digits of the sha256 of the normalized content and referenced files
    version: str = ""
