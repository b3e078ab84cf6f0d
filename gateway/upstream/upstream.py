"""An upstream at run time: its endpoints, their pools, and the balancer that picks one.

An `Upstream` outlives snapshots: a reload that leaves an upstream's config unchanged hands the
same object (and so the same warm pools) to the new snapshot.  Its metrics children are
resolved here once, not per request.
"""

from __future__ import annotations

import asyncio
from typing import Any, final

from gateway.config.model import UpstreamConfig
from gateway.observability.metrics import CounterChild, GatewayMetrics, HistogramChild
from gateway.upstream.balancer import LeastRequest, RoundRobin
from gateway.upstream.pool import EndpointPool


@final
class _PoolMetrics:
    __slots__ = ("_connect", "_fresh", "_reused")

    def __init__(self, connect: HistogramChild, reused: CounterChild, fresh: CounterChild) -> None:
        self._connect = connect
        self._reused = reused
        self._fresh = fresh

    def on_connect(self, seconds: float) -> None:
        self._connect.observe(seconds)

    def on_acquire(self, reused: bool) -> None:
        (self._reused if reused else self._fresh).inc()


@final
class Endpoint:
    __slots__ = ("address", "host", "in_flight", "pool", "port", "weight")

    def __init__(self, host: str, port: int, weight: int, pool: EndpointPool) -> None:
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.weight = weight
        self.in_flight = 0
        self.pool = pool


@final
class Upstream:
    __slots__ = (
        "_balancer",
        "config",
        "connect_timeout",
        "default_host",
        "endpoints",
        "name",
        "request_duration",
        "response_header_timeout",
    )

    def __init__(
        self, config: UpstreamConfig, loop: asyncio.AbstractEventLoop, metrics: GatewayMetrics
    ) -> None:
        self.config = config
        self.name = config.name
        # copied out of the (uncompiled) config: read on every request
        self.connect_timeout = config.connect_timeout
        self.response_header_timeout = config.response_header_timeout
        observer = _PoolMetrics(
            metrics.upstream_connect_duration_seconds.labels(config.name),
            metrics.upstream_connections_total.labels(config.name, "true"),
            metrics.upstream_connections_total.labels(config.name, "false"),
        )
        self.endpoints = [
            Endpoint(
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
                ),
            )
            for e in config.endpoints
        ]
        #: the Host sent upstream when an HTTP/1.0 client sent none
        self.default_host = self.endpoints[0].address.encode("ascii")
        weights = [e.weight for e in self.endpoints]
        self._balancer: RoundRobin | LeastRequest = (
            LeastRequest(weights) if config.balance == "least_request" else RoundRobin(weights)
        )
        self.request_duration: HistogramChild = metrics.upstream_request_duration_seconds.labels(
            config.name
        )

    def pick(self) -> Endpoint:
        return self.endpoints[self._balancer.pick(self.endpoints)]

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.pool.close()

    def describe(self) -> dict[str, Any]:
        """What /admin/upstreams shows of this upstream."""
        return {
            "name": self.name,
            "balance": self.config.balance,
            "endpoints": [
                {
                    "address": e.address,
                    "weight": e.weight,
                    "in_flight": e.in_flight,
                    "pool": {"open": e.pool.opened, "idle": e.pool.idle_count},
                }
                for e in self.endpoints
            ],
        }
