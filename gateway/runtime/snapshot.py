"""The runtime snapshot: a validated config compiled into everything the hot path needs.

`build_snapshot` turns a `GatewayConfig` into a `Snapshot`: the route index, each route's
composed pipeline, upstreams (shared across reloads when unchanged), parsed trusted-proxy
networks, and pre-resolved metrics children.  A snapshot is never mutated after it is built; a
reload builds a new one and swaps a single reference.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any, final

from gateway.config.model import (
    INTERNAL_ECHO,
    GatewayConfig,
    HttpRulesConfig,
    LimitsConfig,
    ListenerConfig,
    MatchConfig,
    RouteConfig,
    StageSpec,
)
from gateway.core.trace_context import ratio_bound
from gateway.downstream.redirect_https import HttpsRedirect
from gateway.errors import InternalError
from gateway.http.messages import Response
from gateway.http.path import (
    PATH_ESCAPED_HASH,
    PATH_ESCAPED_PERCENT,
    PATH_ESCAPED_QUESTION,
    PATH_ESCAPED_SEMICOLON,
    PATH_SEMICOLON,
)
from gateway.observability.access_log import AccessLog
from gateway.observability.instruments import CounterChild
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.tracing import Tracer
from gateway.pipeline import Next, RequestContext, Stage, compose
from gateway.routing import Router
from gateway.runtime.shared import SharedState, StageKey
from gateway.stages.echo import EchoHandler
from gateway.stages.proxy import ProxyHandler
from gateway.stages.registry import KINDS
from gateway.stores.base import Store
from gateway.tls import ListenerTLS, listener_tls
from gateway.upstream.upstream import Upstream


def route_template(match: MatchConfig) -> str:
    """A route's path template for `http.route` (low cardinality: from the config, never the
    request): the exact path, the prefix followed by `*`, or the regex as written."""
    if match.path is not None:
        return match.path
    if match.path_prefix is not None:
        return match.path_prefix.rstrip("/") + "/*"
    if match.path_regex is not None:
        return match.path_regex
    return "/*"


@final
class Route:
    __slots__ = (
        "_children",
        "_last_child",
        "_last_method",
        "_last_status",
        "_requests",
        "config",
        "duration",
        "forward_underscores",
        "handler",
        "max_body_bytes",
        "name",
        "proxy",
        "refused_path_flags",
        "reject_underscores",
        "request_buffering",
        "request_bytes",
        "response_bytes",
        "timeout",
        "trace_bound",
        "trace_route",
        "websocket",
    )

    def __init__(
        self,
        config: RouteConfig,
        handler: Next,
        metrics: GatewayMetrics,
        proxy: ProxyHandler | None = None,
        request_buffering: int = 0,
        trace_ratio: float = 0.0,
    ) -> None:
        self.config = config
        #: the terminal proxy stage (None for the built-in echo)
        self.proxy = proxy
        self.handler = handler
        # copies of config values read on every request (a compiled attribute, not a lookup
        # through the uncompiled config); set once, here — a reload builds a new Route
        self.name = config.name
        self.timeout = config.timeout
        self.max_body_bytes = config.max_body_bytes
        #: request bodies up to this size are read whole before an upstream connection is taken
        self.request_buffering = request_buffering
        self.websocket = config.websocket
        rules = config.http
        #: PATH_* flags (gateway.http.path) that get 400 on this route
        self.refused_path_flags = refused_path_flags(rules)
        #: request headers named with "_": 400, or forwarded (else dropped on the way upstream)
        self.reject_underscores = rules.underscores_in_headers == "reject"
        self.forward_underscores = rules.underscores_in_headers == "allow"
        self._requests = metrics.requests_total
        #: method -> status -> child; nested so the lookup builds no tuple key
        self._children: dict[str, dict[int, CounterChild]] = {}
        #: the child of the last (method, status) counted: most requests of a route repeat
        #: the one before (two dict lookups fewer, ~150 instructions)
        self._last_method = ""
        self._last_status = 0
        self._last_child: CounterChild | None = None
        self.duration = metrics.request_duration_seconds.labels(config.name)
        self.request_bytes = metrics.request_bytes_total.labels(config.name)
        self.response_bytes = metrics.response_bytes_total.labels(config.name)
        #: new traces on this route are sampled under this (the route's sample_ratio, else the
        #: tracing section's; trace_context.ratio_bound)
        self.trace_bound = ratio_bound(
            trace_ratio if config.trace_sample_ratio is None else config.trace_sample_ratio
        )
        #: http.route of its spans: the path template it matches
        self.trace_route = route_template(config.match)

    def draw_upstream(self) -> Upstream | None:
        """The upstream a new request goes to (a weighted draw on a split); None on the
        built-in echo.  Called once per request, by `RequestContext`."""
        proxy = self.proxy
        return None if proxy is None else proxy.draw()

    def requests_child(self, method: str, status: int) -> CounterChild:
        last = self._last_child
        if last is not None and status == self._last_status and method == self._last_method:
            return last
        child = self._requests_child(method, status)
        self._last_method = method
        self._last_status = status
        self._last_child = child
        return child

    def _requests_child(self, method: str, status: int) -> CounterChild:
        by_status = self._children.get(method)
        if by_status is None:
            by_status = self._children[method] = {}
        child = by_status.get(status)
        if child is None:
            child = by_status[status] = self._requests.labels(self.name, method, str(status))
        return child

    def describe(self) -> dict[str, Any]:
        c = self.config
        m = c.match
        stages = [_describe_stage(spec) for spec in c.pipeline]
        return {
            "name": c.name,
            "match": {
                k: v
                for k, v in {
                    "host": m.host,
                    "path": m.path,
                    "path_prefix": m.path_prefix,
                    "path_regex": m.path_regex,
                    "methods": list(m.methods) if m.methods else None,
                    "headers": dict(m.headers) or None,
                    "case_insensitive": m.case_insensitive or None,
                }.items()
                if v is not None
            },
            "upstreams": [{"name": u.name, "weight": u.weight} for u in c.upstreams],
            "strip_prefix": c.strip_prefix,
            "timeout_seconds": c.timeout,
            "max_body_bytes": c.max_body_bytes,
            "request_buffering": self.request_buffering,
            "websocket": c.websocket,
            "http": {
                "underscores_in_headers": c.http.underscores_in_headers,
                "path_semicolons": c.http.path_semicolons,
                "path_escapes": list(c.http.path_escapes),
            },
            "pipeline": [stage["name"] for stage in stages],
            "stages": stages,
        }


_ESCAPE_FLAGS = {
    "percent": PATH_ESCAPED_PERCENT,
    "semicolon": PATH_ESCAPED_SEMICOLON,
    "question_mark": PATH_ESCAPED_QUESTION,
    "hash": PATH_ESCAPED_HASH,
}


def refused_path_flags(rules: HttpRulesConfig) -> int:
    """The PATH_* flags a route with these rules refuses."""
    refused = 0 if rules.path_semicolons == "allow" else PATH_SEMICOLON
    for name, flag in _ESCAPE_FLAGS.items():
        if name not in rules.path_escapes:
            refused |= flag
    return refused


def _describe_stage(spec: StageSpec) -> dict[str, Any]:
    """A pipeline entry for /admin/routes: its name (the middleware's, or the kind), its kind,
    and settings that were resolved for the route, such as an idempotency scope of auto."""
    owner, _, name = spec.owner.partition(":")
    described: dict[str, Any] = {
        "name": name if owner == "middleware" else spec.kind,
        "kind": spec.kind,
    }
    describe = KINDS[spec.kind].describe
    if describe is not None:
        described.update(describe(spec.config))
    return described


@final
class Snapshot:
    __slots__ = (
        "_networks",
        "access_log",
        "body_timeout",
        "config",
        "https_redirects",
        "limits",
        "loaded_at",
        "router",
        "routes",
        "stages",
        "stores",
        "tls",
        "tracer",
        "upstreams",
        "version",
    )

    def __init__(
        self,
        config: GatewayConfig,
        router: Router[Route],
        routes: list[Route],
        upstreams: dict[str, Upstream],
        access_log: AccessLog,
        tracer: Tracer | None = None,
    ) -> None:
        self.config = config
        self.version = config.version
        self.loaded_at = time.time()
        self.limits: LimitsConfig = config.limits
        #: copies config.limits.body_timeout (read on every proxied request); set once, here
        self.body_timeout = config.limits.body_timeout
        self.router = router
        self.routes = routes
        self.upstreams = upstreams
        self.access_log = access_log
        #: None: tracing off (trace headers pass through untouched)
        self.tracer = tracer
        #: (owner, kind) -> (spec, stage), for SharedState.commit
        self.stages: dict[StageKey, tuple[StageSpec, Stage]] = {}
        #: the stores its stages were built with, by name ("memory" included)
        self.stores: dict[str, Store] = {}
        #: listener name -> its certificates as SSL contexts (TLS listeners only)
        self.tls: dict[str, ListenerTLS] = {}
        #: listener name -> the route its requests take instead of routing (`redirect_https`)
        self.https_redirects: dict[str, Route] = {}
        self._networks = [ipaddress.ip_network(c, strict=False) for c in config.trusted_proxies]

    def is_trusted(self, ip: str) -> bool:
        if not self._networks or not ip:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self._networks)


async def _answered_by_pipeline(ctx: RequestContext) -> Response:
    """The terminal of a route without an upstream: its pipeline has a stage that answers every
    request (the loader checks), so nothing ever reaches it."""
    raise InternalError(f"route {ctx.route.name} has no upstream and its pipeline did not answer")


def https_redirect_route(
    listener: ListenerConfig, config: GatewayConfig, metrics: GatewayMetrics, trace_ratio: float
) -> Route:
    """The route every request of a `redirect_https` listener takes (but ACME challenges):
    counted, logged and traced as `redirect_https:<listener>`, under the top-level http rules."""
    assert listener.redirect_https is not None
    name = f"redirect_https:{listener.name}"
    counts = metrics.stage_total
    handler = HttpsRedirect(
        listener.redirect_https,
        counts.labels(name, "redirect_https", "redirected"),
        counts.labels(name, "redirect_https", "no_host"),
    )
    route = RouteConfig(name=name, index=-1, match=MatchConfig(), upstreams=(), http=config.http)
    return Route(route, handler, metrics, None, 0, trace_ratio)


def build_snapshot(config: GatewayConfig, shared: SharedState) -> Snapshot:
    """Compile `config`; the upstreams it creates are live only after `shared.commit`."""
    metrics = shared.metrics
    env = shared.build_context(config.stores)
    upstreams = {u.name: shared.upstream(u) for u in config.upstreams}
    used: dict[str, Upstream] = {}
    routes: list[Route] = []
    stages: dict[StageKey, tuple[StageSpec, Stage]] = {}
    trace_ratio = config.tracing.sample_ratio if config.tracing is not None else 0.0
    for rc in config.routes:
        terminal: Next
        proxy: ProxyHandler | None = None
        buffering = config.limits.request_buffering
        if rc.request_buffering is not None:
            buffering = rc.request_buffering
        if not rc.upstreams:
            terminal = _answered_by_pipeline
        elif len(rc.upstreams) == 1 and rc.upstreams[0].name == INTERNAL_ECHO:
            terminal = EchoHandler(strip_prefix=rc.strip_prefix)
        else:
            picks = []
            for wu in rc.upstreams:
                upstream = upstreams[wu.name]
                used[wu.name] = upstream
                picks.append((upstream, wu.weight))
            terminal = proxy = ProxyHandler(
                picks,
                strip_prefix=rc.strip_prefix,
                websocket=rc.websocket,
                request_buffering=buffering,
                loop=shared.loop,
            )
        pipeline = [shared.stage(spec, stages, env) for spec in rc.pipeline]
        routes.append(
            Route(rc, compose(pipeline, terminal), metrics, proxy, buffering, trace_ratio)
        )
    router = Router.build([(r.config.match, r.config.index, r) for r in routes])
    snapshot = Snapshot(
        config,
        router,
        routes,
        upstreams,
        AccessLog(config.access_log),
        shared.tracer(config.tracing),
    )
    snapshot.stages = stages
    snapshot.stores = dict(env.stores)
    for listener in config.listeners:
        if listener.tls is not None:
            snapshot.tls[listener.name] = listener_tls(listener.tls)
        if listener.redirect_https is not None:
            snapshot.https_redirects[listener.name] = https_redirect_route(
                listener, config, metrics, trace_ratio
            )
    return snapshot
