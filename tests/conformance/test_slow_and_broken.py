"""Slow clients and broken upstreams: each gets its documented answer, others keep being served."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.app import Gateway
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import port_of, running_gateway
from tests.support.raw import close_writer, exchange, is_closed, open_raw, read_response

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_head(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


async def reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"p" * 1000)
    await writer.drain()
    writer.transport.abort()


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    writer.write(b"this is not http at all\r\n\r\n")
    await writer.drain()
    await reader.read()


async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    await reader.read()


async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    await close_writer(writer)


async def healthy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keeps the connection alive; a HEAD gets the length of a body it does not send."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        if head.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()


async def endless_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
    for _ in range(4096):  # 64 MiB, were it all read
        writer.write(b"e" * 16384)
        await writer.drain()


async def endless_trailer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: ")
    for _ in range(4096):
        writer.write(b"t" * 16384)
        await writer.drain()


async def two_responses(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each request twice in one write: the second must never reach a client."""
    while True:
        await _read_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
        )
        await writer.drain()


def _status(code: bytes) -> Behaviour:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.1 %b Odd\r\nContent-Length: 2\r\n\r\nok" % code)
        await writer.drain()
        await reader.read()

    return answer


async def own_request_id(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nX-Request-Id: upstream-id\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()
    await reader.read()


BEHAVIOURS: dict[str, Behaviour] = {
    "endless_header": endless_header,
    "endless_trailer": endless_trailer,
    "two_responses": two_responses,
    "status000": _status(b"000"),
    "status999": _status(b"999"),
    "request_id": own_request_id,
    "reset": reset_mid_body,
    "garbage": garbage,
    "silent": never_answers,
    "close": close_at_once,
    "healthy": healthy,
}


@pytest.fixture
async def broken(tmp_path: Path) -> AsyncIterator[Gateway]:
    servers = []
    ports = {}
    for name, behaviour in BEHAVIOURS.items():

        async def handle(
            reader: asyncio.StreamReader,
            writer: asyncio.StreamWriter,
            behaviour: Behaviour = behaviour,
        ) -> None:
            try:
                await behaviour(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                await close_writer(writer)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        ports[name] = server.sockets[0].getsockname()[1]
    timeouts = {"connect": "1s", "response_header": "1s"}
    config = gateway_yaml(
        limits={"header_timeout": "1s", "body_timeout": "1s", "idle_timeout": "3s"},
        upstreams={
            name: upstream_to(f"http://127.0.0.1:{port}", timeouts=timeouts)
            for name, port in ports.items()
        },
        routes=[route(name, name, f"/{name}") for name in ports],
    )
    async with running_gateway(tmp_path, config) as gateway:
        yield gateway
    for server in servers:
        server.close()


async def test_upstream_reset_mid_body_cuts_the_client(broken: Gateway) -> None:
    reader, writer = await open_raw(port_of(broken))
    writer.write(b"GET /reset HTTP/1.1\r\nHost: a\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    body = await asyncio.wait_for(reader.read(), 5)
    # the head was already sent: the connection is cut before the announced length
    assert len(body) < 100000
    await close_writer(writer)
    assert (
        await exchange(port_of(broken), b"GET /healthy HTTP/1.1\r\nHost: a\r\n\r\n")
    ).status == 200


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/garbage", 502, "upstream_unavailable"),
        ("/close", 502, "upstream_unavailable"),
        ("/silent", 504, "upstream_timeout"),
    ],
)
async def test_broken_upstreams_get_documented_errors(
    broken: Gateway, path: str, status: int, code: str
) -> None:
    port = port_of(broken)
    pending = asyncio.ensure_future(
        exchange(port, f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    )
    # meanwhile others are served
    assert (await exchange(port, b"GET /healthy HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200
    response = await pending
    assert response.status == status
    assert json.loads(response.body)["code"] == code


@pytest.mark.parametrize("path", ["/endless_header", "/status000", "/status999"])
async def test_an_upstream_head_we_cannot_take_is_502_at_once(broken: Gateway, path: str) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await exchange(port_of(broken), f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    assert response.status == 502
    assert json.loads(response.body)["code"] == "upstream_unavailable"
    assert loop.time() - started < 1.0  # not the 1 s response-head timeout


async def test_an_endless_upstream_trailer_cuts_that_response_only(broken: Gateway) -> None:
    reader, writer = await open_raw(port_of(broken))
    writer.write(b"GET /endless_trailer HTTP/1.1\r\nHost: a\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    assert await is_closed(reader, within=5)  # cut, with a bounded trailer read
    await close_writer(writer)
    assert (
        await exchange(port_of(broken), b"GET /healthy HTTP/1.1\r\nHost: a\r\n\r\n")
    ).status == 200


async def test_a_second_response_the_upstream_sends_unasked_never_reaches_a_client(
    broken: Gateway,
) -> None:
    reader, writer = await open_raw(port_of(broken))
    for _ in range(3):
        writer.write(b"GET /two_responses HTTP/1.1\r\nHost: a\r\n\r\n")
        response = await asyncio.wait_for(read_response(reader), 5)
        assert (response.status, response.body) == (200, b"ok")
    await close_writer(writer)


async def test_the_client_gets_one_request_id(broken: Gateway) -> None:
    response = await exchange(port_of(broken), b"GET /request_id HTTP/1.1\r\nHost: a\r\n\r\n")
    ids = [v for n, v in response.headers if n.lower() == "x-request-id"]
    assert len(ids) == 1
    assert ids[0] != "upstream-id"


async def test_refused_connection_is_502(tmp_path: Path) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    config = gateway_yaml(
        upstreams={"gone": upstream_to(f"http://127.0.0.1:{port}")}, routes=[route("gone", "gone")]
    )
    async with running_gateway(tmp_path, config) as gateway:
        response = await exchange(port_of(gateway), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.status == 502
    assert json.loads(response.body)["code"] == "upstream_unavailable"


async def test_slow_head_gets_408_and_close(broken: Gateway) -> None:
    port = port_of(broken)
    reader, writer = await open_raw(port)
    writer.write(b"GET /healthy HTTP/1.1\r\nHost: a\r\n")  # the blank line never comes
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 408
    assert json.loads(response.body)["code"] == "request_timeout"
    assert await is_closed(reader)
    await close_writer(writer)


async def test_slowloris_drip_gets_408(broken: Gateway) -> None:
    reader, writer = await open_raw(port_of(broken))
    writer.write(b"GET /healthy HTTP/1.1\r\nHost: a\r\n")

    async def drip() -> None:
        for i in range(40):
            writer.write(f"X-{i}: a\r\n".encode())
            await asyncio.sleep(0.1)

    dripping = asyncio.ensure_future(drip())
    response = await asyncio.wait_for(read_response(reader), 5)
    dripping.cancel()
    assert response.status == 408
    await close_writer(writer)


async def test_slow_body_gets_408(gw: Gateway) -> None:
    reader, writer = await open_raw(port_of(gw))
    writer.write(b"POST /count HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 408
    await close_writer(writer)


async def test_idle_keep_alive_connection_is_closed(broken: Gateway) -> None:
    reader, writer = await open_raw(port_of(broken))
    writer.write(b"GET /healthy HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
    assert await is_closed(reader, within=6)
    await close_writer(writer)


async def test_head_then_get_on_one_kept_alive_upstream_connection(broken: Gateway) -> None:
    """A HEAD response announces a body that never comes; the next response must parse."""
    reader, writer = await open_raw(port_of(broken))
    writer.write(b"HEAD /healthy HTTP/1.1\r\nHost: a\r\n\r\n")
    head = await asyncio.wait_for(read_response(reader, head_request=True), 5)
    assert head.status == 200
    assert head.header("content-length") == "1000"
    for _ in range(3):
        writer.write(b"GET /healthy HTTP/1.1\r\nHost: a\r\n\r\n")
        response = await asyncio.wait_for(read_response(reader), 5)
        assert response.status == 200
        assert response.body == b"ok"
    pool = broken.snapshot.upstreams["healthy"].endpoints[0].pool
    assert pool.opened == 1  # the same upstream connection served all four
    await close_writer(writer)


async def test_a_body_the_client_stopped_sending_fails_at_once(gw: Gateway) -> None:
    """Found by probing: a client that half-closed mid-body held its request (and possibly an
    upstream connection) until body_timeout; it can never finish, so it is answered now."""
    loop = asyncio.get_running_loop()
    reader, writer = await open_raw(port_of(gw))
    writer.write(b"POST /count HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"h" * 1000)
    await writer.drain()
    started = loop.time()
    writer.write_eof()
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 400
    assert "closed its side" in json.loads(response.body)["detail"]
    assert loop.time() - started < 1.0  # not the 2 s body_timeout
    await close_writer(writer)
