"""An upstream at run time: its endpoints, their pools, and the balancer that picks one.

An `Upstream` outlives snapshots: a reload that leaves an upstream's config unchanged hands the
same object (and so the same warm pools, health and ejection state) to the new snapshot.  Its
metrics children are resolved here once, not per request.

Endpoints leave and rejoin the rotation when active health checks or passive outlier detection
say so.  Those are rare events: each rebuilds the balancer over the endpoints still available,
so a pick costs the same whether or not some endpoint is down, and raises `NoHealthyUpstream`
when none is left.  The retry budget's counters live here too, since it is per upstream.

A reload that removes or changes an upstream `retire`s the old object: the requests routed to it
before the swap, and their retries, finish on its pools, which close each connection after its
exchange.  From then on it stops checking and ejecting — its endpoints stay as they were at the
swap — and it never writes the endpoint gauges again (their labels may be the live upstream's
now).  It reports once its pools hold no connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, final

from gateway.config.model import UpstreamConfig
from gateway.core.outlier import Outliers
from gateway.errors import NoHealthyUpstream
from gateway.observability.instruments import CounterChild, GaugeChild, HistogramChild
from gateway.observability.metrics import GatewayMetrics
from gateway.upstream.balancer import LeastRequest, RoundRobin
from gateway.upstream.health import HealthChecker
from gateway.upstream.pool import EndpointPool, PoolObserver
from gateway.upstream.tls import client_context

log = logging.getLogger("gateway.upstream")


@final
class _PoolMetrics(PoolObserver):
    __slots__ = ("_connect", "_evicted", "_fresh", "_handshake", "_reused")

    def __init__(
        self,
        connect: HistogramChild,
        handshake: HistogramChild,
        reused: CounterChild,
        fresh: CounterChild,
        evicted: CounterChild,
    ) -> None:
        self._connect = connect
        self._handshake = handshake
        self._reused = reused
        self._fresh = fresh
        self._evicted = evicted

    def on_connect(self, seconds: float) -> None:
        self._connect.observe(seconds)

    def on_handshake(self, seconds: float) -> None:
        self._handshake.observe(seconds)

    def on_acquire(self, reused: bool) -> None:
        (self._reused if reused else self._fresh).inc()

    def on_evict(self) -> None:
        self._evicted.inc()


@final
class Endpoint:
    __slots__ = (
        "address",
        "attempts_failed",
        "attempts_succeeded",
        "authority",
        "ejected",
        "ejections",
        "healthy",
        "host",
        "in_flight",
        "index",
        "pool",
        "port",
        "up",
        "weight",
    )

    def __init__(
        self,
        index: int,
        host: str,
        port: int,
        weight: int,
        pool: EndpointPool,
        authority: bytes = b"",
    ) -> None:
        self.index = index
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        #: host[:port] as the endpoint's URL spells it: the Host of a `host: endpoint` rewrite
        self.authority = authority or self.address.encode("ascii")
        self.weight = weight
        self.in_flight = 0
        self.pool = pool
        #: active health checks say so (always True without health checks)
        self.healthy = True
        #: passive outlier detection took it out of rotation
        self.ejected = False
        #: the gateway_upstream_endpoint_up child
        self.up: GaugeChild | None = None
        #: the gateway_upstream_attempts_total children (set by the upstream)
        self.attempts_succeeded: CounterChild | None = None
        self.attempts_failed: CounterChild | None = None
        #: the gateway_outlier_ejections_total child (set by the upstream)
        self.ejections: CounterChild | None = None

    @property
    def available(self) -> bool:
        return self.healthy and not self.ejected


@final
class Upstream:
    __slots__ = (
        "_balancer",
        "_checker",
        "_loop",
        "_on_drained",
        "_outliers",
        "_readmit_timer",
        "_rotation",
        "budget_exhausted",
        "busy",
        "config",
        "connect_timeout",
        "default_host",
        "endpoints",
        "in_flight",
        "name",
        "queue_timeout",
        "request_duration",
        "response_header_timeout",
        "responses",
        "retrying",
    )

    def __init__(
        self, config: UpstreamConfig, loop: asyncio.AbstractEventLoop, metrics: GatewayMetrics
    ) -> None:
        self.config = config
        self.name = config.name
        # copies of config values, read on every request (compiled attributes, not lookups
        # through the uncompiled config); set once, here — a changed config is a new Upstream
        self.connect_timeout = config.connect_timeout
        self.response_header_timeout = config.response_header_timeout
        self.queue_timeout = config.pool_queue_timeout
        observer = _PoolMetrics(
            metrics.upstream_connect_duration_seconds.labels(config.name),
            metrics.upstream_tls_handshake_duration_seconds.labels(config.name),
            metrics.upstream_connections_total.labels(config.name, "true"),
            metrics.upstream_connections_total.labels(config.name, "false"),
            metrics.upstream_evictions_total.labels(config.name),
        )
        self._loop = loop
        tls = client_context(config.tls) if config.endpoints[0].scheme == "https" else None
        server_name = config.tls.server_name if config.tls is not None else None
        self.endpoints = [
            Endpoint(
                i,
                e.host,
                e.port,
                e.weight,
                EndpointPool(
                    loop,
                    e.host,
                    e.port,
                    max_connections=config.pool_max_connections,
                    idle_timeout=config.pool_idle_timeout,
                    connect_timeout=config.connect_timeout,
                    observer=observer,
                    queue_timeout=config.pool_queue_timeout,
                    tls=tls,
                    server_name=server_name,
                ),
                e.authority.encode("ascii"),
            )
            for i, e in enumerate(config.endpoints)
        ]
        attempts = metrics.upstream_attempts_total
        for endpoint in self.endpoints:
            endpoint.up = metrics.upstream_endpoint_up.labels(config.name, endpoint.address)
            endpoint.up.set(1)
            endpoint.attempts_succeeded = attempts.labels(config.name, endpoint.address, "success")
            endpoint.attempts_failed = attempts.labels(config.name, endpoint.address, "failure")
            endpoint.ejections = metrics.outlier_ejections_total.labels(
                config.name, endpoint.address
            )
        #: the Host sent upstream when an HTTP/1.0 client sent none
        self.default_host = self.endpoints[0].address.encode("ascii")
        #: the endpoints in rotation, and a balancer over exactly them
        self._rotation: list[Endpoint] = []
        self._balancer: RoundRobin | LeastRequest | None = None
        self._rebalance()
        self.request_duration: HistogramChild = metrics.upstream_request_duration_seconds.labels(
            config.name
        )
        #: gateway_upstream_responses_total by status class: [0] is 1xx … [4] is 5xx (the
        #: upstream connection refuses a status outside 100-599)
        self.responses: list[CounterChild] = [
            metrics.upstream_responses_total.labels(config.name, f"{n}xx") for n in range(1, 6)
        ]
        #: requests in flight to this upstream, and how many of them are retries (the retry
        #: budget); written only by the methods below
        self.in_flight = 0
        self.retrying = 0
        self.budget_exhausted: CounterChild = metrics.retry_budget_exhausted_total.labels(
            config.name
        )
        #: requests that waited for a pooled connection in vain (503 upstream_busy)
        self.busy: CounterChild = metrics.upstream_busy_total.labels(config.name)
        od = config.outlier_detection
        #: None when outlier detection is off, or stopped (the upstream was retired)
        self._outliers = Outliers(od, len(self.endpoints)) if od is not None else None
        self._readmit_timer: asyncio.TimerHandle | None = None
        hc = config.health_check
        self._checker = (
            HealthChecker(
                loop,
                hc,
                [(e.host, e.port) for e in self.endpoints],
                self._on_health_change,
                tls=tls,
                server_name=server_name,
            )
            if hc is not None
            else None
        )
        self._on_drained: Callable[[Upstream], None] | None = None

    # -- picking -----------------------------------------------------------------------------

    def pick(self, avoid: Endpoint | None = None) -> Endpoint:
        """An endpoint in rotation, other than `avoid` when there is another one."""
        balancer = self._balancer
        if balancer is None:
            raise NoHealthyUpstream(f"every endpoint of upstream {self.name!r} is down")
        rotation = self._rotation
        endpoint = rotation[balancer.pick(rotation)]
        if endpoint is avoid and len(rotation) > 1:
            # weighted picks can repeat; a bounded number of draws, then any other one
            for _ in range(len(rotation)):
                endpoint = rotation[balancer.pick(rotation)]
                if endpoint is not avoid:
                    break
            else:
                endpoint = next(e for e in rotation if e is not avoid)
        return endpoint

    def _rebalance(self) -> None:
        rotation = [e for e in self.endpoints if e.healthy and not e.ejected]
        self._rotation = rotation
        if not rotation:
            self._balancer = None
            return
        weights = [e.weight for e in rotation]
        self._balancer = (
            LeastRequest(weights) if self.config.balance == "least_request" else RoundRobin(weights)
        )

    def _set_state(self, endpoint: Endpoint, *, healthy: bool, ejected: bool) -> None:
        was = endpoint.available
        endpoint.healthy = healthy
        endpoint.ejected = ejected
        now = endpoint.available
        if now != was:
            if endpoint.up is not None:
                endpoint.up.set(1 if now else 0)
            log.warning(
                "endpoint %s of upstream %s is %s",
                endpoint.address,
                self.name,
                "back in rotation" if now else "out of rotation",
                extra={"upstream": self.name, "endpoint": endpoint.address},
            )
        self._rebalance()

    # -- health: active checks and passive outlier detection ---------------------------------

    def _on_health_change(self, index: int, healthy: bool) -> None:
        endpoint = self.endpoints[index]
        self._set_state(endpoint, healthy=healthy, ejected=endpoint.ejected)

    def record(self, endpoint: Endpoint, failure: bool) -> None:
        """The outcome of one attempt on `endpoint`: counted, and judged by outlier detection."""
        counter = endpoint.attempts_failed if failure else endpoint.attempts_succeeded
        if counter is not None:
            counter.inc()
        outliers = self._outliers
        if outliers is None:
            return
        now = self._loop.time()
        if outliers.record(endpoint.index, failure, now):
            if endpoint.ejections is not None:
                endpoint.ejections.inc()
            self._set_state(endpoint, healthy=endpoint.healthy, ejected=True)
            self._schedule_readmission()

    def _schedule_readmission(self) -> None:
        outliers = self._outliers
        if outliers is None:
            return
        if self._readmit_timer is not None:
            self._readmit_timer.cancel()
            self._readmit_timer = None
        when = outliers.next_readmission()
        if when is not None:
            self._readmit_timer = self._loop.call_at(when, self._readmit)

    def _readmit(self) -> None:
        self._readmit_timer = None
        outliers = self._outliers
        if outliers is None:
            return
        for index in outliers.readmit_due(self._loop.time()):
            endpoint = self.endpoints[index]
            self._set_state(endpoint, healthy=endpoint.healthy, ejected=False)
        self._schedule_readmission()

    # -- the retry budget --------------------------------------------------------------------

    # The budget's two counters are written here only: `in_flight` through `sending` /
    # `sent` (the proxy, around each request's tries), `retrying` through `start_retrying` /
    # `stop_retrying` (the retry stage, from a request's first retry to its end).

    def sending(self) -> None:
        """A request starts its tries on this upstream."""
        self.in_flight += 1

    def sent(self) -> None:
        """That request is done with this upstream (answered or failed)."""
        self.in_flight -= 1

    def start_retrying(self, ratio: float, min_concurrent: int) -> bool:
        """Count a request as retrying if one more fits the budget — retries in flight at most
        max(min_concurrent, ratio * requests in flight) — else count the refusal; True if so."""
        retrying = self.retrying
        if retrying < min_concurrent or retrying < ratio * self.in_flight:
            self.retrying = retrying + 1
            return True
        self.budget_exhausted.inc()
        return False

    def stop_retrying(self) -> None:
        """A request counted by `start_retrying` has ended."""
        self.retrying -= 1

    # -- life --------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin active health checks (once the upstream is live; idempotent)."""
        if self._checker is not None:
            self._checker.start()

    def retire(self, on_drained: Callable[[Upstream], None]) -> None:
        """No longer live: serve on for the requests routed here before the swap, then call
        `on_drained(self)` when no pool holds a connection (at once if none does)."""
        self._stop_watching()
        self._on_drained = on_drained
        for endpoint in self.endpoints:
            endpoint.up = None  # the live upstream may have an endpoint by that address
        for endpoint in self.endpoints:
            endpoint.pool.retire(self._pool_drained)

    @property
    def is_drained(self) -> bool:
        """Retired, and none of its pools holds a connection."""
        return all(endpoint.pool.is_drained for endpoint in self.endpoints)

    def _pool_drained(self) -> None:
        on_drained = self._on_drained
        if on_drained is not None and self.is_drained:
            on_drained(self)

    def close(self) -> None:
        """At shutdown (or for a snapshot never committed): stop, and close every pool."""
        self._stop_watching()
        for endpoint in self.endpoints:
            endpoint.pool.close()

    def _stop_watching(self) -> None:
        """No more health checks or outlier decisions: what runs on timers ends here."""
        if self._checker is not None:
            self._checker.close()
        self._outliers = None
        if self._readmit_timer is not None:
            self._readmit_timer.cancel()
            self._readmit_timer = None

    def describe(self) -> dict[str, Any]:
        """What /admin/upstreams shows of this upstream."""
        return {
            "name": self.name,
            "balance": self.config.balance,
            "in_flight": self.in_flight,
            "retries_in_flight": self.retrying,
            "endpoints": [self._describe_endpoint(e) for e in self.endpoints],
        }

    def _describe_endpoint(self, e: Endpoint) -> dict[str, Any]:
        described: dict[str, Any] = {
            "address": e.address,
            "weight": e.weight,
            "up": e.available,
            "in_flight": e.in_flight,
            "pool": {"open": e.pool.opened, "idle": e.pool.idle_count},
        }
        checker = self._checker
        if checker is not None:
            described["health"] = {
                "healthy": e.healthy,
                "last_error": checker.last_error(e.index),
            }
        outliers = self._outliers
        if outliers is not None:
            until = outliers.ejected_until(e.index)
            described["outlier"] = {
                "ejected": e.ejected,
                # wall-clock time, for people reading the admin API
                "ejected_until": (
                    None if until is None else time.time() + (until - self._loop.time())
                ),
                "ejections": outliers.ejections(e.index),
            }
        return described
