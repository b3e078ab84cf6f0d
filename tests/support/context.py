"""A real `RequestContext` for unit tests of stages: built from a config like the gateway's."""

from __future__ import annotations

import asyncio

from gateway.http.messages import RequestBody, RequestHead
from gateway.observability.exposition import Registry
from gateway.observability.metrics import GatewayMetrics
from gateway.pipeline import Peer, RequestContext
from gateway.runtime.shared import SharedState
from gateway.runtime.snapshot import Snapshot, build_snapshot
from tests.support.config import parse_config

ECHO_CONFIG = """
listeners: [{name: http, bind: "127.0.0.1:0"}]
routes:
  - {name: app, match: {path_prefix: /}, upstream: internal:echo}
"""


def make_snapshot(config: str = ECHO_CONFIG) -> Snapshot:
    """Must be called with a running loop (upstream pools belong to it)."""
    shared = SharedState(asyncio.get_running_loop(), GatewayMetrics(Registry()))
    return build_snapshot(parse_config(config), shared)


def make_context(
    head: RequestHead | None = None,
    *,
    body: RequestBody | None = None,
    snapshot: Snapshot | None = None,
    route: str = "app",
    ip: str = "192.0.2.7",
    trusted: bool = False,
) -> RequestContext:
    snapshot = snapshot or make_snapshot()
    matched = next(r for r in snapshot.routes if r.name == route)
    peer = Peer(ip, trusted=trusted, scheme="http", listener="http")
    loop = asyncio.get_running_loop()
    return RequestContext(
        head or RequestHead(), body, matched, snapshot, peer, b"test-request-id", loop.time()
    )
