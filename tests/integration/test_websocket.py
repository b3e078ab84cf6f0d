"""Upgrade: websocket is tunnelled only on routes that allow it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from tests.support.gateway import port_of, running_gateway


@pytest.fixture
async def ws_gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    async def ws(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(text="plain")
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            if message.type == WSMsgType.TEXT:
                await socket.send_str("echo:" + message.data)
        return socket

    app = web.Application()
    app.router.add_get("/{tail:.*}", ws)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    config = f"""
listeners: [{{name: http, bind: "127.0.0.1:0"}}]
admin: {{bind: "127.0.0.1:0"}}
access_log: {{enabled: false}}
upstreams:
  ws: {{endpoints: [{{url: "http://127.0.0.1:{server.port}"}}]}}
routes:
  - {{name: ws, match: {{path_prefix: /ws}}, upstream: ws, websocket: true}}
  - {{name: plain, match: {{path_prefix: /plain}}, upstream: ws}}
"""
    async with running_gateway(tmp_path, config) as gateway:
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
