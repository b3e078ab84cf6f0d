"""The configuration model: frozen dataclasses, one per YAML mapping of SPEC §2.

Values here are already normalized: durations are float seconds, sizes are int bytes, names
are resolved.  The loader (load.py) builds these from raw YAML and reports errors with their
YAML path; nothing here touches the file system or the network.  A pipeline stage's config is
not here: each stage kind's module (gateway/stages/<kind>.py) owns its config class, and a
`StageSpec` carries it as an opaque value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

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
    #: `redirect_https: {port}`: every request on this plain-HTTP listener is answered 308 to
    #: https on this port, but /.well-known/acme-challenge/ (None: off); changes live
    redirect_https: int | None = None

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
class StatusConfig:
    """The status listener (SPEC §8): /healthz, /readyz and /metrics only, never /admin/*, so
    probes and scrapers can reach it while the admin API stays on loopback or behind its token."""

    host: str
    port: int


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


@dataclass(frozen=True, slots=True)
class TracingBatchConfig:
    """How finished spans are queued and sent: at most `max_queue_size` wait (more are dropped
    and counted), sent `max_export_batch_size` at a time, at least every `schedule_delay`."""

    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    schedule_delay: float = 5.0


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """The top-level `tracing:` section; its absence turns tracing off (trace headers then pass
    through untouched)."""

    service_name: str = "gateway"
    #: the share of new traces sampled; an incoming traceparent's sampled flag wins
    sample_ratio: float = 0.01
    exporter: Literal["none", "console", "otlp"] = "none"
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    #: the collector's URL; "" = the protocol's local default
    endpoint: str = ""
    #: sent with every export (an API key from ${ENV}); never logged
    headers: tuple[tuple[str, str], ...] = ()
    #: resource attributes besides service.name (deployment.environment.name …)
    resource: tuple[tuple[str, str], ...] = ()
    #: one export call's limit
    timeout: float = 10.0
    batch: TracingBatchConfig = field(default_factory=TracingBatchConfig)

    @property
    def collector_url(self) -> str:
        if self.endpoint:
            return self.endpoint
        if self.protocol == "grpc":
            return "http://127.0.0.1:4317"
        return "http://127.0.0.1:4318/v1/traces"


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

    @property
    def authority(self) -> str:
        """``host[:port]`` as the URL spells it (the port only when written, the host in lower
        case, an IPv6 address in brackets, no userinfo): the Host a `rewrite: {host: endpoint}`
        stage sends, as a client that was given this URL would."""
        netloc = urlsplit(self.url).netloc.rpartition("@")[2]
        host = f"[{self.host}]" if ":" in self.host else self.host
        # the port as written (after the host, past an IPv6 literal's "]"), even the default
        port = netloc.rpartition("]")[2].partition(":")[2]
        return f"{host}:{port}" if port else host


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
class StoreTLSConfig:
    """How a `rediss://` store verifies Redis, and the certificate it presents to it."""

    #: CA bundle Redis's certificate is verified against (None = the system's)
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreConfig:
    """A named shared store (`stores: {NAME: ...}`, SPEC §2): today a Redis."""

    name: str
    type: Literal["redis"] = "redis"
    #: redis://, rediss:// or unix:// (a password in it, from ${ENV}, is never shown); empty
    #: for a cluster, whose seed nodes are `nodes`
    url: str = ""
    #: a Redis Cluster: `nodes` are its seed nodes (redis:// or rediss://, one scheme, the same
    #: credentials), from which the client learns every master and its slots
    cluster: bool = False
    nodes: tuple[str, ...] = ()
    #: put before every key the gateway writes, so several gateways can share one Redis
    prefix: str = "gw:"
    #: bounds every operation (connecting included); past it the stage's on_store_error rules
    timeout: float = 0.1
    #: connections per worker (to each master, for a cluster)
    pool_size: int = 32
    tls: StoreTLSConfig | None = None


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
class StageSpec:
    """One pipeline entry: its kind, its config and who owns its state.

    `owner` is `middleware:<name>` for a named middleware (one instance shared by every route
    that names it) or `route:<route>:<position>` for an inline stage (the route's own).
    """

    kind: str
    #: the kind's frozen config class, parsed by the kind's module (gateway/stages/<kind>.py)
    config: object
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
    #: `tracing: {sample_ratio}`: this route's share of new traces (None = the top-level one)
    trace_sample_ratio: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    listeners: tuple[ListenerConfig, ...]
    admin: AdminConfig = field(default_factory=AdminConfig)
    #: None: no status listener
    status: StatusConfig | None = None
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    http: HttpRulesConfig = field(default_factory=HttpRulesConfig)
    #: CIDR strings, validated by the loader
    trusted_proxies: tuple[str, ...] = ()
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    #: None: tracing off
    tracing: TracingConfig | None = None
    upstreams: tuple[UpstreamConfig, ...] = ()
    #: the named shared stores ("memory", per worker, always exists and is not listed)
    stores: tuple[StoreConfig, ...] = ()
    #: named stages, by name
    middlewares: tuple[StageSpec, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    #: absolute path of the file this came from ("" when built from a string)
    source: str = ""
    #: every file it references (certificates, keys, CAs, JWKS), absolute, symlinks kept
    files: tuple[str, ...] = ()
    #: first 12 hex digits of the sha256 of the normalized content and referenced files
    version: str = ""
