"""Admin API, metrics, access log, trusted proxies, connection limits, drain — over real sockets."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import select
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from gateway.downstream import connection as server_module
from gateway.observability import access_log
from tests.integration.conftest import Seen
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import (
    assert_too_many_connections,
    in_flight_requests,
    port_of,
    running_gateway,
)
from tests.support.process import async_wait_until
from tests.support.raw import close_writer, exchange, is_closed, open_raw, read_response


def _config(upstream_port: int) -> str:
    return gateway_yaml(
        # the token through an environment variable's default, as a deployment may write it
        admin={"bind": "127.0.0.1:0", "token": "${ADMIN_TOKEN_FOR_TEST:-s3cret}"},
        limits={
            "max_connections": 3,
            "header_timeout": "2s",
            "body_timeout": "1s",
            "idle_timeout": "5s",
        },
        trusted_proxies=["127.0.0.1"],
        shutdown={"drain_delay": "300ms", "timeout": "5s"},
        access_log={"enabled": True, "sample_ratio": 1.0, "exclude_fields": ["bytes_in"]},
        upstreams={"app": upstream_to(f"http://127.0.0.1:{upstream_port}")},
        routes=[route("app", "app")],
    )


@pytest.fixture
async def edge(tmp_path: Path, upstream: tuple[TestServer, Seen]) -> AsyncIterator[Gateway]:
    server, _ = upstream
    async with running_gateway(tmp_path, _config(server.port or 0)) as gateway:
        yield gateway


def _admin(gateway: Gateway) -> str:
    assert gateway.admin is not None
    return f"http://127.0.0.1:{gateway.admin.port}"


async def test_admin_endpoints_and_token(edge: Gateway) -> None:
    base = _admin(edge)
    auth = {"Authorization": "Bearer s3cret"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/healthz") as r:
            assert r.status == 200
            assert await r.text() == "ok"
        async with session.get(f"{base}/readyz") as r:
            assert r.status == 200
            assert (await r.json())["state"] == "ready"
        async with session.get(f"{base}/admin/config") as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await r.json(content_type=None))["code"] == "unauthenticated"
        async with session.get(f"{base}/admin/config", headers={"Authorization": "Bearer no"}) as r:
            assert r.status == 401
        async with session.get(f"{base}/admin/config", headers=auth) as r:
            info = await r.json()
            assert info["version"] == edge.snapshot.version
            assert info["source"].endswith("gateway.yaml")
            assert info["last_reload"]["ok"] is True
        async with session.get(f"{base}/admin/routes", headers=auth) as r:
            routes = await r.json()
            assert routes[0]["name"] == "app"
            assert routes[0]["upstreams"] == [{"name": "app", "weight": 1}]
        async with session.get(f"{base}/admin/upstreams", headers=auth) as r:
            upstreams = await r.json()
            assert upstreams[0]["name"] == "app"
            assert upstreams[0]["endpoints"][0]["pool"]["open"] >= 1  # warmed at start
        async with session.post(f"{base}/admin/reload", headers=auth) as r:
            assert r.status == 200
            assert (await r.json())["ok"] is True


ADMIN_CREDENTIALS = [
    ("right-token", b"Authorization: Bearer s3cret\r\n", 200),
    ("lower-case-scheme", b"Authorization: bearer s3cret\r\n", 200),
    ("upper-case-scheme", b"Authorization: BEARER s3cret\r\n", 200),
    ("two-spaces", b"Authorization: Bearer  s3cret\r\n", 200),
    ("not-utf8", b"Authorization: Bearer \xff\r\n", 401),
    ("not-ascii-after-token", b"Authorization: Bearer s3cret\xc3\xa9\r\n", 401),
    ("wrong-token", b"Authorization: Bearer s3cre7\r\n", 401),
    ("token-prefix", b"Authorization: Bearer s3c\r\n", 401),
    ("other-scheme", b"Authorization: Basic czNjcmV0\r\n", 401),
    ("scheme-only", b"Authorization: Bearer\r\n", 401),
    ("missing", b"", 401),
    # which one would count? the data plane answers 400; the admin API, 401
    ("two-headers", b"Authorization: Bearer s3cret\r\nAuthorization: Bearer x\r\n", 401),
]


@pytest.mark.parametrize(
    ("header", "status"), [c[1:] for c in ADMIN_CREDENTIALS], ids=[c[0] for c in ADMIN_CREDENTIALS]
)
async def test_admin_credentials_as_raw_bytes(edge: Gateway, header: bytes, status: int) -> None:
    assert edge.admin is not None
    request = b"GET /admin/config HTTP/1.1\r\nHost: a\r\n" + header + b"Connection: close\r\n\r\n"
    response = await exchange(edge.admin.port, request)
    assert response.status == status
    if status == 401:
        assert (response.header("www-authenticate") or "").startswith("Bearer")
        assert json.loads(response.body)["code"] == "unauthenticated"


async def test_metrics_count_requests_and_reuse(edge: Gateway) -> None:
    port = port_of(edge)
    for _ in range(3):
        assert (await exchange(port, b"GET /m HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200
    assert (await exchange(port, b"GET /m HTTP/1.1\r\n\r\n")).status == 400
    async with aiohttp.ClientSession() as session, session.get(f"{_admin(edge)}/metrics") as r:
        text = await r.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    ok = ("gateway_requests_total", (("code", "200"), ("method", "GET"), ("route", "app")))
    assert samples[ok] == 3
    bad = ("gateway_requests_total", (("code", "400"), ("method", "OTHER"), ("route", "")))
    assert samples[bad] == 1
    reused = samples[
        ("gateway_upstream_connections_total", (("reused", "true"), ("upstream", "app")))
    ]
    assert reused >= 2
    assert samples[("gateway_requests_in_flight", ())] == 0
    assert samples[("gateway_config_last_reload_success", ())] == 1
    version = ("gateway_config_info", (("version", edge.snapshot.version),))
    assert samples[version] == 1


async def test_access_log_lines(edge: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    port = port_of(edge)
    await exchange(
        port, b"GET /logged?token=secret HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer x\r\n\r\n"
    )
    edge.snapshot.access_log.flush()
    access_log.STDOUT.flush()
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    entry = next(line for line in lines if line.get("path") == "/logged")
    assert entry["status"] == 200
    assert entry["route"] == "app"
    assert entry["upstream"] == "app"
    assert entry["attempts"] == 1
    assert "bytes_in" not in entry  # excluded by config
    assert "secret" not in out.getvalue()
    assert "Bearer" not in out.getvalue()


async def test_trusted_peer_keeps_request_id_and_appends_forwarded_for(
    edge: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    _, seen = upstream
    response = await exchange(
        port_of(edge),
        b"GET /t HTTP/1.1\r\nHost: a\r\nX-Request-Id: lb-123\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\n\r\n",
    )
    assert response.header("x-request-id") == "lb-123"
    headers = {k.lower(): v for k, v in seen.requests[-1]["headers"]}
    assert headers[b"x-request-id"] == b"lb-123"
    assert headers[b"x-forwarded-for"] == b"203.0.113.9, 127.0.0.1"


def _refused(gateway: Gateway, reason: str = "max_connections") -> float:
    return float(gateway.metrics.connections_refused_total.labels("http", reason).value)


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _hold_every_connection(port: int) -> list[Connection]:
    """Open limits.max_connections (3) keep-alive connections, each served once."""
    held = [await open_raw(port) for _ in range(3)]
    for reader, writer in held:
        writer.write(b"GET /h HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await read_response(reader)).status == 200
    return held


async def test_a_connection_over_the_limit_is_answered_503_and_closed(edge: Gateway) -> None:
    port = port_of(edge)
    held = await _hold_every_connection(port)
    reader, writer = await open_raw(port)
    writer.write(b"GET /over HTTP/1.1\r\nHost: a\r\n\r\n")
    response = await asyncio.wait_for(read_response(reader), 5)
    assert_too_many_connections(response, "limits.max_connections")
    assert await is_closed(reader)
    await close_writer(writer)
    assert _refused(edge) == 1
    assert len(edge.connections) == 3  # a refused connection never counts as served
    for _, w in held:
        await close_writer(w)
    # once they are gone, new connections are served again
    assert (await exchange(port, b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200


async def test_a_refused_connection_that_sends_nothing_is_closed_after_its_timer(
    edge: Gateway,
) -> None:
    port = port_of(edge)
    held = await _hold_every_connection(port)
    loop = asyncio.get_running_loop()
    reader, writer = await open_raw(port)
    opened = loop.time()
    # closed without a byte: nothing was asked
    assert await asyncio.wait_for(reader.read(1), 5) == b""
    # the gateway's timer starts after our connect returned; libuv may fire it a few ms early
    assert loop.time() - opened >= server_module._REFUSAL_SECONDS - 0.1
    await close_writer(writer)
    assert _refused(edge) == 1
    for _, w in held:
        await close_writer(w)


async def test_a_flood_of_refused_connections_is_closed_at_once_and_others_are_served(
    edge: Gateway,
) -> None:
    port = port_of(edge)
    held = await _hold_every_connection(port)
    waiting = [await open_raw(port) for _ in range(server_module._MAX_REFUSING)]
    await async_wait_until(
        lambda: _refused(edge) == server_module._MAX_REFUSING, what="every refusal counted"
    )
    # past that many waiting refusals, more are closed without a byte, and without waiting
    # for a request (they send none); a reset is as good as an end of stream here
    flood = [await open_raw(port) for _ in range(16)]
    for reader, _ in flood:
        assert await is_closed(reader, within=1.0)
    # the first ones were still waiting all along: each gets its whole 503
    for _, writer in waiting:
        writer.write(b"GET /over HTTP/1.1\r\nHost: a\r\n\r\n")
    for reader, _ in waiting:
        response = await asyncio.wait_for(read_response(reader), 5)
        assert_too_many_connections(response, "limits.max_connections")
    assert _refused(edge) == server_module._MAX_REFUSING + 16
    # the connections being served were never disturbed, and serve on
    for reader, writer in held:
        writer.write(b"GET /still HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
    for _, w in [*held, *waiting, *flood]:
        await close_writer(w)
    assert (await exchange(port, b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200


async def test_client_that_never_reads_is_dropped_and_others_are_served(edge: Gateway) -> None:
    port = port_of(edge)
    _, writer = await open_raw(port)
    transport = writer.transport
    transport.pause_reading()
    # ask for far more than the socket buffers hold, and never read it
    writer.write(b"GET /big?size=67108864 HTTP/1.1\r\nHost: a\r\n\r\n")
    ok = await exchange(port, b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n")
    assert ok.status == 200
    # body_timeout (1s) after writing stalled, the gateway aborts the stalled connection
    await async_wait_until(lambda: not edge.connections, within=10, what="stalled client dropped")
    await close_writer(writer)


async def test_drain_finishes_in_flight_and_reports_not_ready(edge: Gateway) -> None:
    port = port_of(edge)
    base = _admin(edge)
    in_flight = asyncio.ensure_future(
        exchange(port, b"GET /slow?s=0.8 HTTP/1.1\r\nHost: a\r\n\r\n")
    )
    await async_wait_until(lambda: in_flight_requests(edge) == 1, what="request in flight")
    draining = asyncio.ensure_future(edge.drain())
    async with aiohttp.ClientSession() as session, session.get(f"{base}/readyz") as r:
        assert r.status == 503
        assert (await r.json())["state"] == "draining"
    # during drain_delay the listener still accepts
    assert (await exchange(port, b"GET /during HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200
    response = await in_flight
    assert response.status == 200
    assert response.header("connection") == "close"
    await asyncio.wait_for(draining, 10)
    with pytest.raises(ConnectionRefusedError):
        await open_raw(port)


# The three tests below run the drain step that follows drain_delay (`_stop_accepting`) by
# awaiting it directly: it runs up to its first await without the loop reading a socket, so
# each test decides what the gateway has read when draining begins.


async def test_draining_answers_a_request_already_queued_on_an_idle_connection(
    edge: Gateway,
) -> None:
    port = port_of(edge)
    reader, writer = await open_raw(port)
    writer.write(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await read_response(reader)).header("connection") is None  # kept alive: idle now
    (conn,) = edge.connections
    assert conn.transport is not None
    writer.write(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
    # in the gateway's receive queue, and the loop has not run since: nobody has read it
    assert select.select([conn.transport.get_extra_info("socket")], [], [], 5)[0]
    await edge._stop_accepting()
    response = await asyncio.wait_for(read_response(reader), 5)
    assert (response.status, response.body) == (200, b"GET /second 0")
    assert response.header("connection") == "close"
    assert await is_closed(reader)
    await close_writer(writer)


async def test_draining_serves_a_connection_that_has_not_sent_its_request_yet(
    edge: Gateway,
) -> None:
    """Its client connected to send one: perhaps the listener accepted it as it closed."""
    port = port_of(edge)
    reader, writer = await open_raw(port)
    await async_wait_until(lambda: len(edge.connections) == 1, what="the connection is made")
    await edge._stop_accepting()
    writer.write(b"GET /late HTTP/1.1\r\nHost: a\r\n\r\n")
    response = await asyncio.wait_for(read_response(reader), 5)
    assert (response.status, response.header("connection")) == (200, "close")
    await close_writer(writer)


async def test_draining_half_closes_an_idle_connection_and_drops_a_crossing_request_quietly(
    edge: Gateway,
) -> None:
    """A request that crosses the gateway's FIN meets a clean end of stream, which a client
    retries, never a reset (which could also destroy an answer still on its way)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port_of(edge)))
        await loop.sock_sendall(sock, b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        received = b""
        while not received.endswith(b"GET /first 0"):
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
            assert data, received
            received += data
        await edge._stop_accepting()
        assert await asyncio.wait_for(loop.sock_recv(sock, 1), 5) == b""
        # the request that was on its way as the gateway shut its side, then our own end
        await loop.sock_sendall(sock, b"GET /crossing HTTP/1.1\r\nHost: a\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        await async_wait_until(lambda: not edge.connections, what="the gateway closes too")
        # a gateway that had closed outright would have answered the request with a reset
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    finally:
        sock.close()


async def test_a_malformed_admin_request_is_logged_without_its_bytes(
    edge: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by probing: aiohttp logged a traceback quoting the Authorization value."""
    assert edge.admin is not None
    secret = b"Z" * 9000
    with caplog.at_level(logging.INFO, logger="aiohttp.server"):
        response = await exchange(
            edge.admin.port,
            b"GET /admin/config HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
            + secret
            + b"\r\n\r\n",
        )
    assert response.status == 400
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [r.getMessage() for r in records] == ["admin listener: malformed request (LineTooLong)"]
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in records)
    assert "ZZZZ" not in caplog.text

