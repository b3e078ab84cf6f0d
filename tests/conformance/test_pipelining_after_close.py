"""Nothing pipelined behind a response that closes the connection is run (RFC 9112 §9.6): the
client may send it again elsewhere, so running it here could run it twice.  Found by probing:
llhttp went on through the rest of the buffer after such a request, and its followers were
queued and forwarded.  Each case counts what reached the upstream, and the in-flight gauge."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from tests.integration.conftest import Seen
from tests.support.gateway import in_flight_requests, port_of
from tests.support.process import async_wait_until
from tests.support.raw import close_writer, exchange, is_closed, open_raw, read_response

FOLLOWER = b"POST /transfer?to=mallory HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"

CLOSING_FIRST = {
    "refused_path": b"POST /admin;x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nzz",
    "too_large": b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\nzz",
    "http10": b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n",
    "connection_close": b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    "upgrade_too_large": b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: foo\r\n"
    b"Content-Length: 2000000\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(CLOSING_FIRST))
async def test_a_request_behind_a_closing_answer_is_never_run(
    name: str, gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    _, seen = upstream
    reader, writer = await open_raw(port_of(gw))
    writer.write(CLOSING_FIRST[name] + FOLLOWER)
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.header("connection") == "close"
    assert await is_closed(reader)  # one answer, then the end: no second response
    await close_writer(writer)
    await async_wait_until(lambda: in_flight_requests(gw) == 0, what="nothing left in flight")
    assert not any(r["path"].startswith("/transfer") for r in seen.requests)
    ok = await exchange(port_of(gw), b"GET /still-up HTTP/1.1\r\nHost: a\r\n\r\n")
    assert ok.status == 200
