"""Upgrade requests and the bytes after their head (issue 11, defect 1).

llhttp ends the message at the head of every request carrying `Upgrade` and `Connection:
upgrade`, whatever body it declares.  On a route that does not tunnel, that body must be read
exactly as declared and forwarded, never parsed as another request; on a route that tunnels, a
handshake with a body is refused.  Each case counts what the upstream received.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from tests.integration.conftest import Seen, upstream_app
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import port_of, running_gateway
from tests.support.raw import close_writer, is_closed, open_raw, read_response

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data)


@pytest.fixture
async def upgrade_gw(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Seen]]:
    seen = Seen()
    app = upstream_app(seen)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    config = gateway_yaml(
        limits={"max_body_bytes": "1KiB", "header_timeout": "2s", "body_timeout": "2s"},
        upstreams={"app": upstream_to(f"http://127.0.0.1:{server.port}")},
        routes=[
            route("ws", "app", "/ws", websocket=True),
            route("app", "app", methods=["GET", "POST", "PUT"]),
        ],
    )
    async with running_gateway(tmp_path, config) as gateway:
        yield gateway, seen
    await server.close()


def _headers(request: dict[str, object]) -> dict[bytes, bytes]:
    raw = request["headers"]
    assert isinstance(raw, list)
    return {bytes(k).lower(): bytes(v) for k, v in raw}


BODY_CASES = {
    "issue_repro": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(SMUGGLED), SMUGGLED)
    ),
    "chunked": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(SMUGGLED)
    ),
    "keep_alive_and_upgrade": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: foo\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(SMUGGLED), SMUGGLED)
    ),
    "websocket_on_plain_route": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(SMUGGLED), SMUGGLED)
    ),
    "h2c": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(SMUGGLED), SMUGGLED)
    ),
    "two_connection_headers": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\nConnection: upgrade\r\n"
        b"Upgrade: foo\r\nContent-Length: %d\r\n\r\n%b" % (len(SMUGGLED), SMUGGLED)
    ),
    "expect_continue": (
        b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n%b" % (len(SMUGGLED), SMUGGLED)
    ),
}


@pytest.mark.parametrize("name", sorted(BODY_CASES))
async def test_body_of_an_upgrade_request_is_a_body(
    name: str, upgrade_gw: tuple[Gateway, Seen]
) -> None:
    gateway, seen = upgrade_gw
    reader, writer = await open_raw(port_of(gateway))
    writer.write(BODY_CASES[name])
    response = await asyncio.wait_for(read_response(reader), 5)
    if response.status == 100:
        response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 200, response.body
    # one answer, then the connection ends: the body was never read as a second request
    assert await is_closed(reader)
    await close_writer(writer)
    assert [(r["method"], r["path"]) for r in seen.requests] == [("POST", "/a")]
    forwarded = seen.requests[0]
    assert forwarded["body"] == SMUGGLED
    headers = _headers(forwarded)
    assert b"upgrade" not in headers
    assert b"http2-settings" not in headers or name != "h2c"


async def test_body_arriving_in_pieces_is_framed_as_declared(
    upgrade_gw: tuple[Gateway, Seen],
) -> None:
    gateway, seen = upgrade_gw
    reader, writer = await open_raw(port_of(gateway))
    payload = SMUGGLED + SMUGGLED
    writer.write(
        b"PUT /a HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: foo\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    await writer.drain()
    for i in range(0, len(payload), 7):
        writer.write(b"%x\r\n%b\r\n" % (len(payload[i : i + 7]), payload[i : i + 7]))
        await writer.drain()
    writer.write(b"0\r\n\r\n" + SMUGGLED)  # and a "pipelined" request after the body
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 200
    assert await is_closed(reader)
    await close_writer(writer)
    assert [(r["method"], r["path"], r["body"]) for r in seen.requests] == [("PUT", "/a", payload)]


async def test_bodyless_upgrade_is_ignored_and_pipelining_goes_on(
    upgrade_gw: tuple[Gateway, Seen],
) -> None:
    """A genuinely pipelined request after a body-less upgrade request is still served — read
    by the new parser the connection switched to: its own method, its own Connection: close."""
    gateway, seen = upgrade_gw
    reader, writer = await open_raw(port_of(gateway))
    writer.write(
        b"GET /first HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n"
        b"PUT /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    first = await asyncio.wait_for(read_response(reader), 5)
    second = await asyncio.wait_for(read_response(reader), 5)
    assert await is_closed(reader)
    await close_writer(writer)
    assert (first.status, second.status) == (200, 200)
    assert [(r["method"], r["path"]) for r in seen.requests] == [
        ("GET", "/first"),
        ("PUT", "/second"),
    ]
    assert b"upgrade" not in _headers(seen.requests[0])


async def test_refused_upgrade_request_never_parses_its_body(
    upgrade_gw: tuple[Gateway, Seen],
) -> None:
    """405: answered without reading the body, which is still not a request."""
    gateway, seen = upgrade_gw
    reader, writer = await open_raw(port_of(gateway))
    writer.write(
        b"DELETE /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(SMUGGLED), SMUGGLED)
    )
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 405
    assert await is_closed(reader)
    await close_writer(writer)
    assert seen.requests == []


async def test_oversized_body_of_an_upgrade_request_is_413(
    upgrade_gw: tuple[Gateway, Seen],
) -> None:
    gateway, seen = upgrade_gw
    reader, writer = await open_raw(port_of(gateway))
    writer.write(
        b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n"
        b"Content-Length: 5000\r\n\r\n" + SMUGGLED * 3
    )
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 413
    assert await is_closed(reader)
    await close_writer(writer)
    assert seen.requests == []


async def test_websocket_handshake_with_a_body_is_refused(
    upgrade_gw: tuple[Gateway, Seen],
) -> None:
    gateway, seen = upgrade_gw
    reader, writer = await open_raw(port_of(gateway))
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(SMUGGLED), SMUGGLED)
    )
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 400
    assert json.loads(response.body)["code"] == "bad_request"
    assert await is_closed(reader)
    await close_writer(writer)
    assert seen.requests == []


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (
            b"GET /ws HTTP/1.0\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "1.0",
        ),
        (
            b"POST /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: 5\r\n\r\nhello",
            "post",
        ),
    ],
    ids=["http10", "post"],
)
async def test_only_an_http11_get_is_a_websocket_handshake(
    head: bytes, reason: str, upgrade_gw: tuple[Gateway, Seen]
) -> None:
    """Found by probing: an HTTP/1.0 or POST handshake was tunnelled (and rewritten as 1.1)."""
    gateway, seen = upgrade_gw
    reader, writer = await open_raw(port_of(gateway))
    writer.write(head)
    response = await asyncio.wait_for(read_response(reader), 5)
    await close_writer(writer)
    assert response.status == 200, reason  # answered as an ordinary request
    assert b"upgrade" not in _headers(seen.requests[-1])


async def test_two_upgrade_headers_are_400(upgrade_gw: tuple[Gateway, Seen]) -> None:
    gateway, seen = upgrade_gw
    reader, writer = await open_raw(port_of(gateway))
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: foo\r\n"
        b"Upgrade: websocket\r\n\r\n"
    )
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 400
    assert "Upgrade" in json.loads(response.body)["detail"]
    await close_writer(writer)
    assert seen.requests == []


async def test_malformed_chunked_body_of_an_upgrade_request_is_400(
    upgrade_gw: tuple[Gateway, Seen],
) -> None:
    """The body parser is llhttp's own: invalid chunk sizes fail like on any request."""
    gateway, seen = upgrade_gw
    reader, writer = await open_raw(port_of(gateway))
    writer.write(
        b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + SMUGGLED
    )
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 400
    assert "chunk size" in json.loads(response.body)["detail"]
    assert await is_closed(reader)
    await close_writer(writer)
    assert seen.requests == []


async def test_bytes_after_a_tunnelled_head_never_enter_the_upstream_head(
    tmp_path: Path,
) -> None:
    """A client that sends data right behind its handshake (before the 101): those bytes are
    the tunnel's, written upstream after the switch, never part of the forwarded head (where
    "EVIL\\r\\nX-Injected: 1" would have become a header line)."""
    heads: list[bytes] = []
    tunnelled = asyncio.get_running_loop().create_future()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        data = await reader.read(100)
        if not tunnelled.done():
            tunnelled.set_result(data)
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = gateway_yaml(
        upstreams={"ws": upstream_to(f"http://127.0.0.1:{port}")},
        routes=[route("ws", "ws", "/ws", websocket=True)],
    )
    try:
        async with running_gateway(tmp_path, config) as gateway:
            reader, writer = await open_raw(port_of(gateway))
            writer.write(
                b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                b"EVIL\r\nX-Injected: 1\r\n"
            )
            response = await asyncio.wait_for(read_response(reader, head_request=True), 5)
            assert response.status == 101
            assert await asyncio.wait_for(tunnelled, 5) == b"EVIL\r\nX-Injected: 1\r\n"
            await close_writer(writer)
    finally:
        server.close()
    assert len(heads) == 1
    assert b"EVIL" not in heads[0]
    assert b"X-Injected" not in heads[0]
