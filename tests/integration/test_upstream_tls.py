"""TLS to upstreams over real sockets: verification, SNI name, client certificates, pooling."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.app import Gateway
from tests.support.certs import Issued, TestCA
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import port_of, running_gateway
from tests.support.metrics import whole_milliseconds
from tests.support.raw import exchange


@asynccontextmanager
async def https_upstream(
    server: Issued, client_ca: TestCA | None = None
) -> AsyncIterator[tuple[int, list[dict[str, object]]]]:
    seen: list[dict[str, object]] = []

    async def handle(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        seen.append({"path": request.path, "client_cert": peer is not None})
        return web.Response(text="secure")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(server.cert), str(server.key))
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(client_ca.path))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield port, seen
    finally:
        await runner.cleanup()


def _config(port: int, tls: Mapping[str, Any]) -> str:
    return gateway_yaml(
        upstreams={"app": upstream_to(f"https://127.0.0.1:{port}", tls=tls)},
        routes=[route("app", "app")],
    )


async def _get(gw: Gateway) -> tuple[int, bytes]:
    response = await exchange(port_of(gw), b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    return response.status, response.body


async def _metric(gw: Gateway, name: str) -> float:
    assert gw.admin is not None
    url = f"http://127.0.0.1:{gw.admin.port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        text = await r.text()
    line = next(x for x in text.splitlines() if x.startswith(name))
    return float(line.split()[-1])


async def test_verified_pooled_tls_with_handshake_metrics(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    server = ca.issue("upstream", dns=("users.internal",))
    async with https_upstream(server) as (port, seen):
        tls = {"ca": ca.path, "server_name": "users.internal"}
        async with running_gateway(tmp_path, _config(port, tls)) as gw:
            for _ in range(3):
                assert await _get(gw) == (200, b"secure")
            handshakes = 'gateway_upstream_tls_handshake_duration_seconds_count{upstream="app"}'
            # the warm-up connection and at most one more: requests reuse pooled connections
            assert 1 <= await _metric(gw, handshakes) <= 2
            # timed with a clock finer than uvloop's whole milliseconds
            handshake_time = await _metric(gw, handshakes.replace("_count", "_sum"))
            assert handshake_time > 0
            assert not whole_milliseconds(handshake_time)
            reused = 'gateway_upstream_connections_total{upstream="app",reused="true"}'
            assert await _metric(gw, reused) >= 2
    assert len(seen) == 3


async def test_wrong_name_or_unknown_ca_is_a_502(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    other = TestCA(tmp_path, "other")
    server = ca.issue("upstream", dns=("users.internal",))
    async with https_upstream(server) as (port, seen):
        for tls in (
            {"ca": ca.path, "server_name": "billing.internal"},
            {"ca": other.path, "server_name": "users.internal"},
        ):
            async with running_gateway(tmp_path, _config(port, tls)) as gw:
                status, body = await _get(gw)
                assert status == 502
                problem = json.loads(body)
                assert problem["code"] == "upstream_unavailable"
                assert "TLS handshake" in problem["detail"]
    assert seen == []


async def test_upstream_mtls_presents_the_configured_certificate(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    server = ca.issue("upstream", dns=("users.internal",))
    client = ca.issue("gateway-client", dns=("gateway.internal",), client=True)
    async with https_upstream(server, client_ca=ca) as (port, seen):
        without = {"ca": ca.path, "server_name": "users.internal"}
        with_cert = {**without, "cert": client.cert, "key": client.key}
        async with running_gateway(tmp_path, _config(port, with_cert)) as gw:
            assert await _get(gw) == (200, b"secure")
        assert seen == [{"path": "/x", "client_cert": True}]
        async with running_gateway(tmp_path, _config(port, without)) as gw:
            status, _ = await _get(gw)
            assert status == 502
