"""Upgrade: websocket is tunnelled only on routes that allow it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import port_of, running_gateway


async def _echo(request: web.Request) -> web.StreamResponse:
    """A WebSocket echo ("echo:" + each text message), or "plain" without an upgrade."""
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return web.Response(text="plain")
    socket = web.WebSocketResponse()
    await socket.prepare(request)
    async for message in socket:
        if message.type == WSMsgType.TEXT:
            await socket.send_str("echo:" + message.data)
    return socket


async def _echo_server() -> TestServer:
    app = web.Application()
    app.router.add_get("/{tail:.*}", _echo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


def _config(server: TestServer, *, pool: Mapping[str, Any] | None = None, **sections: Any) -> str:
    """Route /ws tunnels WebSockets to the echo `server`, route /plain does not; `pool` is the
    upstream's."""
    options = {} if pool is None else {"pool": pool}
    return gateway_yaml(
        upstreams={"ws": upstream_to(f"http://127.0.0.1:{server.port}", **options)},
        routes=[route("ws", "ws", "/ws", websocket=True), route("plain", "ws", "/plain")],
        **sections,
    )


@pytest.fixture
async def ws_gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    server = await _echo_server()
    async with running_gateway(tmp_path, _config(server)) as gateway:
        yield gateway
    await server.close()


async def test_websocket_is_tunnelled(ws_gateway: Gateway) -> None:
    port = port_of(ws_gateway)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://127.0.0.1:{port}/ws") as socket,
    ):
        for i in range(3):
            await socket.send_str(f"m{i}")
            message = await socket.receive(timeout=5)
            assert message.data == f"echo:m{i}"


async def test_websocket_refused_on_route_without_it(ws_gateway: Gateway) -> None:
    port = port_of(ws_gateway)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await session.ws_connect(f"http://127.0.0.1:{port}/plain")
        async with session.get(f"http://127.0.0.1:{port}/plain") as response:
            assert await response.text() == "plain"


@pytest.fixture
async def ws_small_pool(tmp_path: Path) -> AsyncIterator[Gateway]:
    """A one-connection pool and a 1 s tunnel idle timeout, in front of the echo upstream."""
    server = await _echo_server()
    config = _config(
        server,
        pool={"max_connections": 1, "queue_timeout": "2s"},
        limits={"tunnel_idle_timeout": "1s", "idle_timeout": "30s"},
    )
    try:
        async with running_gateway(tmp_path, config) as gateway:
            yield gateway
    finally:
        await server.close()


async def test_tunnels_do_not_hold_pool_slots(ws_small_pool: Gateway) -> None:
    """Found by probing: eight silent WebSockets held every pooled connection of their upstream."""
    port = port_of(ws_small_pool)
    async with aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(f"http://127.0.0.1:{port}/ws") for _ in range(3)]
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with session.get(f"http://127.0.0.1:{port}/plain") as response:
            assert await response.text() == "plain"
        assert loop.time() - started < 1.0  # a free slot at once, not the queue timeout
        for socket in sockets:
            await socket.close()


async def test_an_idle_tunnel_is_closed_and_a_busy_one_is_not(ws_small_pool: Gateway) -> None:
    port = port_of(ws_small_pool)
    async with aiohttp.ClientSession() as session:
        idle = await session.ws_connect(f"http://127.0.0.1:{port}/ws")
        busy = await session.ws_connect(f"http://127.0.0.1:{port}/ws")
        loop = asyncio.get_running_loop()
        started = loop.time()
        while loop.time() - started < 2.5:  # busy: a message every 0.3 s, past the 1 s timeout
            await busy.send_str("ping")
            assert (await busy.receive(timeout=5)).data == "echo:ping"
            await asyncio.sleep(0.3)
        closed = await idle.receive(timeout=5)
        assert closed.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
        await busy.send_str("still")
        assert (await busy.receive(timeout=5)).data == "echo:still"
        await busy.close()
