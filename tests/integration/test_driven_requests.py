"""A connection's requests run on its own callbacks while they wait only on the gateway's
waiters (its next request, an upstream's answer: gateway.core.waiter), and in a task once they
wait on anything else (a body still arriving, a new upstream connection).  Each way, and every
switch between them, answers each request once, in order; a client that leaves while its
request is driven unwinds it as a cancelled task would."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator

from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from gateway.downstream.connection import HttpConnection
from tests.integration.conftest import Seen
from tests.support.gateway import in_flight_requests, pooled_connections, port_of
from tests.support.process import async_wait_until
from tests.support.raw import close_writer, exchange, open_raw, read_response


def _only_connection(gw: Gateway) -> HttpConnection:
    connections = list(gw.connections)
    assert len(connections) == 1
    return connections[0]


@contextlib.asynccontextmanager
async def _warm_connection(
    gw: Gateway,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter, HttpConnection]]:
    """A client connection that has been answered once (GET /warm), and the gateway's end of
    it; closed at the end."""
    reader, writer = await open_raw(port_of(gw))
    try:
        writer.write(b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
        yield reader, writer, _only_connection(gw)
    finally:
        await close_writer(writer)


def _driven(conn: HttpConnection) -> bool:
    """Its requests are run by its callbacks (no task), waiting for what comes next."""
    return conn._task is None and conn._coro is not None and conn._waiting is not None


async def test_keep_alive_requests_are_driven_by_the_connection_once_the_pool_is_warm(
    gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    _, seen = upstream
    reader, writer = await open_raw(port_of(gw))
    try:
        for i in range(5):
            writer.write(b"GET /a%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            response = await asyncio.wait_for(read_response(reader), 5)
            assert (response.status, response.body) == (200, b"GET /a%d 0" % i)
        # the first one waited for a new upstream connection, in a task; the rest were driven
        assert _driven(_only_connection(gw))
    finally:
        await close_writer(writer)
    assert [r["path"] for r in seen.requests] == [f"/a{i}" for i in range(5)]


async def test_a_body_still_arriving_moves_the_request_to_a_task_and_the_next_one_back(
    gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    _, seen = upstream
    async with _warm_connection(gw) as (reader, writer, conn):
        assert _driven(conn)
        writer.write(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
        await async_wait_until(lambda: conn._task is not None, what="the request in a task")
        assert conn._coro is None  # one runner at a time
        writer.write(b"world")
        response = await asyncio.wait_for(read_response(reader), 5)
        assert (response.status, response.body) == (200, b"POST /up 10")
        writer.write(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        response = await asyncio.wait_for(read_response(reader), 5)
        assert (response.status, response.body) == (200, b"GET /after 0")
        await async_wait_until(lambda: _driven(conn), what="driven again")
    assert [(r["path"], r["body"]) for r in seen.requests] == [
        ("/warm", b""),
        ("/up", b"helloworld"),
        ("/after", b""),
    ]


async def test_pipelined_requests_are_answered_in_order_whichever_way_each_runs(
    gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    _, seen = upstream
    async with _warm_connection(gw) as (reader, writer, _):
        # plain, with a body (complete on arrival), plain, answered by the gateway, plain
        writer.write(
            b"GET /p1 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /p2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /p3 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /p5 HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        answers = [await asyncio.wait_for(read_response(reader), 5) for _ in range(5)]
    assert [a.status for a in answers] == [200] * 5
    assert [answers[i].body for i in (0, 1, 2, 4)] == [
        b"GET /p1 0",
        b"POST /p2 3",
        b"GET /p3 0",
        b"GET /p5 0",
    ]
    assert [r["path"] for r in seen.requests] == ["/warm", "/p1", "/p2", "/p3", "/p5"]


async def test_a_client_leaving_while_its_driven_request_waits_unwinds_it(
    gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    server, seen = upstream
    async with _warm_connection(gw) as (_, writer, conn):
        writer.write(b"GET /slow?s=5 HTTP/1.1\r\nHost: a\r\n\r\n")
        await async_wait_until(lambda: len(seen.slow_peer_ports) == 1, what="upstream reached")
        assert _driven(conn)  # waiting for the upstream's head, on the connection's callbacks
        app = next(r for r in gw.snapshot.routes if r.name == "app")
        cancelled = app.requests_child("GET", 499)
        before = cancelled.value
        # a reset (a FIN alone is a half-close, and its request is still answered)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        await async_wait_until(lambda: in_flight_requests(gw) == 0, what="request unwound")
        await async_wait_until(lambda: not gw.connections, what="connection gone")
        assert (conn._coro, conn._task, conn._waiting) == (None, None, None)
        assert cancelled.value == before + 1
    # the upstream connection carried an unanswered request: closed, never reused
    address = f"127.0.0.1:{server.port}"
    await async_wait_until(
        lambda: pooled_connections(gw)[address] == 0, what="upstream connection closed"
    )


async def test_a_driven_request_gets_a_task_before_connecting_upstream(
    gw: Gateway, upstream: tuple[TestServer, Seen], waits_outside_a_task: list[str]
) -> None:
    """A driven request (no task) gets one before each of its waits with a timeout: here a new
    upstream connection's; a JWKS refetch's in test_jwt_stage (key rotation), the Redis
    store's in tests/e2e.  `waits_outside_a_task`: tests/integration/conftest.py."""
    server, seen = upstream
    port = port_of(gw)
    # the connection the gateway opened at start is busy with this one ...
    slow = asyncio.ensure_future(exchange(port, b"GET /slow?s=0.3 HTTP/1.1\r\nHost: a\r\n\r\n"))
    await async_wait_until(lambda: len(seen.slow_peer_ports) == 1, what="upstream reached")
    # ... so this one, driven from its arrival, opens another
    response = await exchange(port, b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.status == 200
    assert (await slow).status == 200
    assert pooled_connections(gw)[f"127.0.0.1:{server.port}"] == 2
    assert waits_outside_a_task == []


async def test_a_request_queued_when_the_connection_is_aborted_is_never_run(
    gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    """The driven request loop starts on the loop's next turn: a connection aborted (shutdown)
    in between runs nothing it had queued — nothing reaches the upstream, nothing stays in
    flight."""
    _, seen = upstream
    async with _warm_connection(gw) as (_, _, conn):
        # arrives and is aborted in one turn of the loop, as at a shutdown
        conn.data_received(b"GET /never HTTP/1.1\r\nHost: a\r\n\r\n")
        assert in_flight_requests(gw) == 1
        conn.abort()
        # out of flight only once answered, had it been sent: the upstream would have seen it
        await async_wait_until(lambda: in_flight_requests(gw) == 0, what="request dropped")
        assert (conn._coro, conn._task) == (None, None)
    assert [r["path"] for r in seen.requests] == ["/warm"]
