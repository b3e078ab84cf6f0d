"""The data plane over real sockets: a gateway in-process, an aiohttp upstream behind it."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from gateway.http.messages import Response
from tests.integration.conftest import Seen
from tests.support.gateway import port_of
from tests.support.raw import close_writer, exchange, is_closed, open_raw, read_response


def _headers_of(seen: Seen, index: int = -1) -> dict[str, str]:
    return {k.decode().lower(): v.decode() for k, v in seen.requests[index]["headers"]}


async def test_get_is_proxied_with_forwarding_headers(
    gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    _, seen = upstream
    port = port_of(gw)
    response = await exchange(
        port,
        b"GET /hello?x=1 HTTP/1.1\r\nHost: api.test\r\nX-Forwarded-For: 6.6.6.6\r\n"
        b"X-Request-Id: spoofed\r\nClient-Cert: :Zm9v:\r\nX-Forwarded-Client-Cert: x\r\n\r\n",
    )
    assert response.status == 200
    assert response.body == b"GET /hello?x=1 0"
    headers = _headers_of(seen)
    assert headers["host"] == "api.test"
    assert headers["x-forwarded-for"] == "127.0.0.1"  # untrusted peer: replaced, not appended
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "api.test"
    assert "client-cert" not in headers
    assert "x-forwarded-client-cert" not in headers
    request_id = headers["x-request-id"]
    assert request_id != "spoofed"
    assert response.header("x-request-id") == request_id
    # hop-by-hop and Connection-named headers of the response never reach the client
    assert response.header("x-secret") is None
    assert response.header("x-upstream") == "yes"


async def test_gateway_does_not_announce_itself(gw: Gateway) -> None:
    for target in (b"/echo", b"/ro/x"):
        response = await exchange(
            port_of(gw), b"DELETE " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        assert response.header("server") is None


async def test_connection_named_headers_cannot_remove_gateway_headers(
    gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    _, seen = upstream
    response = await exchange(
        port_of(gw),
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Forwarded-For, X-Request-Id, "
        b"X-Drop-Me\r\nX-Drop-Me: 1\r\nX-Keep: 2\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
        b"Proxy-Authorization: secret\r\n\r\n",
    )
    assert response.status == 200
    headers = _headers_of(seen)
    assert "x-drop-me" not in headers
    assert headers["x-keep"] == "2"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert "x-request-id" in headers
    for hop in ("keep-alive", "te", "proxy-authorization", "connection"):
        assert hop not in headers


async def test_header_bytes_are_forwarded_unchanged(
    gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    _, seen = upstream
    await exchange(port_of(gw), b"GET /x HTTP/1.1\r\nHost: a\r\nX-MiXeD-Case: \xe9t\xe9  v\r\n\r\n")
    raw = dict(seen.requests[-1]["headers"])
    assert raw[b"X-MiXeD-Case"] == b"\xe9t\xe9  v"


async def test_keep_alive_reuses_upstream_connections(
    gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    _, seen = upstream
    port = port_of(gw)
    reader, writer = await open_raw(port)
    for i in range(20):
        writer.write(f"GET /k{i} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        response = await read_response(reader)
        assert response.status == 200
        assert response.body.startswith(f"GET /k{i} ".encode())
    await close_writer(writer)
    assert len(seen.requests) == 20
    # sequential requests share the warm upstream connection
    assert len(seen.peers) == 1


async def test_pipelined_requests_are_answered_in_order(gw: Gateway) -> None:
    reader, writer = await open_raw(port_of(gw))
    writer.write(b"".join(f"GET /p{i} HTTP/1.1\r\nHost: a\r\n\r\n".encode() for i in range(5)))
    for i in range(5):
        response = await asyncio.wait_for(read_response(reader), 5)
        assert response.body.startswith(f"GET /p{i} ".encode())
    await close_writer(writer)


async def test_post_bodies_content_length_and_chunked(
    gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    _, seen = upstream
    port = port_of(gw)
    response = await exchange(
        port, b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert response.body == b"POST /a 5"
    assert seen.requests[-1]["body"] == b"hello"
    response = await exchange(
        port,
        b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nX-Trailer: t\r\n\r\n",
    )
    assert response.body == b"POST /b 7"
    assert seen.requests[-1]["body"] == b"abcdefg"
    assert "x-trailer" not in _headers_of(seen)


async def test_large_bodies_stream_both_ways(gw: Gateway) -> None:
    port = port_of(gw)
    size = 900 * 1024
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/count", data=b"y" * size) as response:
            assert response.status == 200
            assert await response.text() == str(size)
        async with session.get(f"http://127.0.0.1:{port}/big?size={5 * 1024 * 1024}") as response:
            assert response.status == 200
            assert response.headers.get("Transfer-Encoding") == "chunked"
            assert len(await response.read()) == 5 * 1024 * 1024
        async with session.get(f"http://127.0.0.1:{port}/big?size=3000000&length=1") as response:
            assert response.headers["Content-Length"] == "3000000"
            assert len(await response.read()) == 3000000


async def test_expect_100_continue(gw: Gateway, upstream: tuple[TestServer, Seen]) -> None:
    _, seen = upstream
    reader, writer = await open_raw(port_of(gw))
    writer.write(
        b"PUT /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"data")
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.body == b"PUT /upload 4"
    assert "expect" not in _headers_of(seen)
    await close_writer(writer)


async def test_expect_100_continue_refused_without_reading(gw: Gateway) -> None:
    reader, writer = await open_raw(port_of(gw))
    writer.write(
        b"PUT /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 413
    assert json.loads(response.body)["code"] == "payload_too_large"
    assert await is_closed(reader)
    await close_writer(writer)


async def test_head_204_304_framing(gw: Gateway) -> None:
    port = port_of(gw)
    reader, writer = await open_raw(port)
    writer.write(b"HEAD /big?size=1000&length=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    response = await asyncio.wait_for(read_response(reader, head_request=True), 5)
    assert response.status == 200
    assert response.header("content-length") == "1000"
    # the connection is still usable: no body bytes were sent after the HEAD response
    for code in (204, 304):
        writer.write(f"GET /status/{code} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        response = await asyncio.wait_for(read_response(reader), 5)
        assert response.status == code
        assert response.header("transfer-encoding") is None
    writer.write(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.body.startswith(b"GET /after")
    await close_writer(writer)


async def test_http10_client(gw: Gateway) -> None:
    reader, writer = await open_raw(port_of(gw))
    writer.write(b"GET /big?size=100 HTTP/1.0\r\n\r\n")
    head = await asyncio.wait_for(reader.read(), 5)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Transfer-Encoding" not in head
    assert head.endswith(b"x" * 100)
    await close_writer(writer)


async def test_errors_are_problem_json(gw: Gateway) -> None:
    port = port_of(gw)
    response = await exchange(port, b"DELETE /ro HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.status == 405
    allow = (response.header("allow") or "").split(", ")
    assert "GET" in allow
    assert "DELETE" not in allow
    assert response.header("content-type") == "application/problem+json"
    problem = json.loads(response.body)
    assert problem["code"] == "method_not_allowed"
    assert problem["status"] == 405
    assert problem["request_id"] == response.header("x-request-id")
    assert set(problem) == {"type", "title", "status", "detail", "code", "request_id"}


async def test_echo_route(gw: Gateway) -> None:
    response = await exchange(
        port_of(gw), b"POST /echo/x?q=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
    )
    assert response.status == 200
    echoed = json.loads(response.body)
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/echo/x"
    assert echoed["query"] == "q=1"
    assert echoed["body"] == "hi"
    assert echoed["headers"]["x-forwarded-for"] == "127.0.0.1"


async def test_upstream_timeout_is_504_and_others_keep_being_served(gw: Gateway) -> None:
    port = port_of(gw)
    slow = asyncio.ensure_future(exchange(port, b"GET /slow?s=10 HTTP/1.1\r\nHost: a\r\n\r\n"))
    fast = await exchange(port, b"GET /fast HTTP/1.1\r\nHost: a\r\n\r\n")
    assert fast.status == 200
    response = await slow
    assert response.status == 504
    assert json.loads(response.body)["code"] == "upstream_timeout"


async def test_unexpected_error_is_a_500_problem_and_the_traceback_only_in_the_log(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    route = next(r for r in gw.snapshot.routes if r.name == "echo")

    async def broken(ctx: object) -> Response:
        raise RuntimeError("boom internals")

    route.handler = broken
    response = await exchange(port_of(gw), b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.status == 500
    assert json.loads(response.body)["code"] == "internal_error"
    assert b"boom" not in response.body
    assert b"Traceback" not in response.body
    assert "boom internals" in caplog.text
    # the connection and the gateway carry on
    assert (await exchange(port_of(gw), b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200
