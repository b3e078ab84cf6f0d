"""Run the gateway in-process on a config written to a temporary directory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import textwrap
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from gateway.app import Gateway
from tests.support.raw import RawResponse


def write_config(directory: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


@contextlib.asynccontextmanager
async def running_gateway(
    directory: Path, text: str, *, watch: bool = False
) -> AsyncIterator[Gateway]:
    """Start a gateway on `text` (use port 0 for listeners and admin); drain it afterwards.

    With `watch`, it reloads when the file changes, as `gateway run` does (ready once the watch
    is in place)."""
    path = write_config(directory, text)
    gateway = Gateway(str(path), watch=watch)
    await gateway.start()
    try:
        if gateway.watcher is not None:
            await asyncio.wait_for(gateway.watcher.ready.wait(), 5)
        yield gateway
    finally:
        await gateway.stop()
        # let connection_lost callbacks of closed transports run
        await asyncio.sleep(0)


def in_flight_requests(gateway: Gateway) -> float:
    """The gateway's own count of requests being handled."""
    return float(gateway.metrics.requests_in_flight.labels().value)


def port_of(gateway: Gateway, listener: str = "http") -> int:
    return gateway.bound[listener][1]


def pooled_connections(gateway: Gateway) -> Counter[str]:
    """Connections the live upstreams' pools hold open (idle or busy), by endpoint address."""
    counts: Counter[str] = Counter()
    for upstream in gateway.snapshot.upstreams.values():
        for endpoint in upstream.endpoints:
            counts[endpoint.address] += endpoint.pool.opened
    return counts


def assert_too_many_connections(response: RawResponse, limit: str) -> None:
    """The whole 503 a connection over a limit gets (README "Limits and errors")."""
    assert response.status == 503
    assert response.header("content-type") == "application/problem+json"
    assert response.header("retry-after") == "1"
    assert response.header("connection") == "close"
    problem = json.loads(response.body)
    assert problem["code"] == "too_many_connections"
    assert problem["status"] == 503
    assert limit in problem["detail"]
    assert problem["request_id"] == response.header("x-request-id")
