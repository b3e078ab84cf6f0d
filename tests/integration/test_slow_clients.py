"""Slow clients cannot hold upstream connections (issue 11, defect 3), over real sockets.

Each defence on its own: request buffering (a body trickling in takes no upstream connection),
the minimum data rate both ways (slow uploads get 408, slow readers are cut), a bounded wait for
a pool slot (503 `upstream_busy`), stalled readers giving their pooled connection to a waiting
request, and a per-client connection limit.  `tests/e2e/test_slow_attacks.py` runs the real
attack tools against a gateway process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.faulty import faulty_upstreams
from tests.support.gateway import assert_too_many_connections, port_of, running_gateway
from tests.support.process import async_wait_until
from tests.support.raw import close_writer, exchange, is_closed, open_raw, read_response

BIG = 8 * 1024 * 1024


class BigUpstream:
    """Answers /big with BIG bytes as fast as it may, anything else with a small body; counts
    the request heads it received (the gateway pre-opens pooled connections while warming, so
    connections say nothing about when a request took one)."""

    def __init__(self) -> None:
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                if head.startswith(b"GET /big"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
                    chunk = b"b" * 65536
                    for _ in range(BIG // len(chunk)):
                        writer.write(chunk)
                        await writer.drain()
                else:
                    answer = b"got %d" % len(body)
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(answer), answer)
                    )
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _config(
    upstream_port: int,
    *,
    limits: Mapping[str, Any] | None = None,
    pool: Mapping[str, Any] | None = None,
) -> str:
    """`limits` beside a 10 s body_timeout; `pool` the upstream's."""
    return gateway_yaml(
        limits={"body_timeout": "10s", **(limits or {})},
        trusted_proxies=["127.0.0.2/32"],
        upstreams={"app": upstream_to(f"http://127.0.0.1:{upstream_port}", pool=pool or {})},
        routes=[route("app", "app")],
    )


def _min_rate(bytes_per_second: str, grace: str) -> dict[str, Any]:
    return {"min_data_rate": {"bytes_per_second": bytes_per_second, "grace": grace}}


def _one_connection(queue_timeout: str) -> dict[str, Any]:
    """A pool of one connection, waited for up to `queue_timeout`."""
    return {"max_connections": 1, "queue_timeout": queue_timeout}


@pytest.fixture
async def big() -> AsyncIterator[tuple[BigUpstream, int]]:
    upstream = BigUpstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    try:
        yield upstream, server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _read_to_the_end(reader: asyncio.StreamReader) -> int:
    """Bytes read until the connection ends, by EOF or by a reset."""
    received = 0
    try:
        while data := await asyncio.wait_for(reader.read(1 << 20), 5):
            received += len(data)
    except ConnectionResetError:
        pass
    return received


def _counter(gateway: Gateway, family: str, *labels: str) -> float:
    metric = getattr(gateway.metrics, family)
    return float(metric.labels(*labels).value)


async def test_a_buffered_body_takes_no_upstream_connection_until_complete(
    tmp_path: Path, big: tuple[BigUpstream, int]
) -> None:
    upstream, port = big
    async with running_gateway(tmp_path, _config(port)) as gateway:
        reader, writer = await open_raw(port_of(gateway))
        writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 20000\r\n\r\n")
        for _ in range(5):
            writer.write(b"x" * 1000)
            await writer.drain()
            await asyncio.sleep(0.05)
        # the gateway is waiting for the rest of the body: it has not touched the upstream
        assert upstream.requests == 0
        writer.write(b"x" * 15000)
        response = await asyncio.wait_for(read_response(reader), 5)
        await close_writer(writer)
        assert (response.status, response.body) == (200, b"got 20000")
        assert upstream.requests == 1


async def test_a_larger_body_streams_once_the_buffer_is_full(
    tmp_path: Path, big: tuple[BigUpstream, int]
) -> None:
    upstream, port = big
    config = _config(port, limits={"request_buffering": "4KiB"})
    async with running_gateway(tmp_path, config) as gateway:
        reader, writer = await open_raw(port_of(gateway))
        writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 20000\r\n\r\n")
        writer.write(b"x" * 3000)
        await writer.drain()
        await asyncio.sleep(0.1)  # time enough to go upstream, were it going to
        assert upstream.requests == 0  # not even the first 4KiB yet
        writer.write(b"x" * 2000)
        await async_wait_until(lambda: upstream.requests == 1, what="the upload streams")
        writer.write(b"x" * 15000)
        response = await asyncio.wait_for(read_response(reader), 5)
        await close_writer(writer)
        assert (response.status, response.body) == (200, b"got 20000")


async def test_a_slow_upload_gets_408_and_never_reaches_the_upstream(
    tmp_path: Path, big: tuple[BigUpstream, int]
) -> None:
    upstream, port = big
    config = _config(port, limits=_min_rate("1KiB", "1s"))
    async with running_gateway(tmp_path, config) as gateway:
        loop = asyncio.get_running_loop()
        reader, writer = await open_raw(port_of(gateway))
        writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n")
        started = loop.time()
        response_task = asyncio.ensure_future(read_response(reader))
        while not response_task.done() and loop.time() - started < 5:
            writer.write(b"y" * 10)  # ~100 bytes a second, every write well within body_timeout
            await writer.drain()
            await asyncio.wait({response_task}, timeout=0.1)
        response = await asyncio.wait_for(response_task, 5)
        assert response.status == 408
        assert "slower than 1024 bytes a second" in json.loads(response.body)["detail"]
        # after the grace period (the loop clock counts whole milliseconds: 1.000 is after it),
        # within a sweep or two
        assert 1.0 <= loop.time() - started < 3.0
        assert await is_closed(reader)
        await close_writer(writer)
        assert upstream.requests == 0
        assert _counter(gateway, "slow_clients_total", "http", "upload") == 1


async def test_an_upload_the_gateway_holds_back_is_not_slow(
    tmp_path: Path, big: tuple[BigUpstream, int]
) -> None:
    """Time the gateway itself kept the client paused never counts against its rate."""
    _, port = big
    config = _config(port, limits=_min_rate("100MiB", "200ms"))
    async with running_gateway(tmp_path, config) as gateway:
        body = b"z" * 50000
        response = await exchange(
            port_of(gateway),
            b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body),
        )
        assert response.status == 200


async def test_a_client_that_stops_reading_is_cut(
    tmp_path: Path, big: tuple[BigUpstream, int]
) -> None:
    _, port = big
    config = _config(port, limits=_min_rate("64KiB", "1s"))
    async with running_gateway(tmp_path, config) as gateway:
        loop = asyncio.get_running_loop()
        reader, writer = await open_raw(port_of(gateway))
        writer.transport.pause_reading()
        writer.write(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        started = loop.time()
        await async_wait_until(
            lambda: _counter(gateway, "slow_clients_total", "http", "download") == 1,
            within=5,
            what="the stalled reader is cut",
        )
        assert 1.0 < loop.time() - started < 3.0
        writer.transport.resume_reading()
        assert await _read_to_the_end(reader) < BIG
        await close_writer(writer)


async def test_a_slow_but_steady_reader_is_not_cut(
    tmp_path: Path, big: tuple[BigUpstream, int]
) -> None:
    """Reading 64 KiB every 0.2 s (~320 KiB/s) is above a 64 KiB/s minimum: never cut."""
    _, port = big
    config = _config(port, limits=_min_rate("64KiB", "500ms"))
    async with running_gateway(tmp_path, config) as gateway:
        reader, writer = await open_raw(port_of(gateway))
        writer.write(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        received = 0
        for _ in range(15):  # 3 s: well past the grace period
            received += len(await asyncio.wait_for(reader.read(65536), 5))
            await asyncio.sleep(0.2)
        while received < BIG:
            data = await asyncio.wait_for(reader.read(1 << 20), 5)
            assert data, (received, _counter(gateway, "slow_clients_total", "http", "download"))
            received += len(data)
        await close_writer(writer)
        assert _counter(gateway, "slow_clients_total", "http", "download") == 0


async def test_a_full_pool_answers_503_upstream_busy_after_queue_timeout(tmp_path: Path) -> None:
    async with faulty_upstreams("up") as [up]:
        config = _config(up.port, pool=_one_connection("300ms"))
        async with running_gateway(tmp_path, config) as gateway:
            port = port_of(gateway)
            up.mode = "hang"
            first = asyncio.ensure_future(exchange(port, b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"))
            await async_wait_until(lambda: up.total == 1, what="the first request holds the pool")
            loop = asyncio.get_running_loop()
            started = loop.time()
            second = await exchange(port, b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
            waited = loop.time() - started
            assert second.status == 503
            assert json.loads(second.body)["code"] == "upstream_busy"
            assert second.header("retry-after") == "1"
            assert 0.25 < waited < 1.5
            assert up.total == 1  # never sent
            assert gateway.metrics.upstream_busy_total.labels("app").value == 1
            first.cancel()


async def test_a_stalled_reader_gives_its_connection_to_a_waiting_request(
    tmp_path: Path, big: tuple[BigUpstream, int]
) -> None:
    upstream, port = big
    config = _config(port, pool=_one_connection("5s"))
    async with running_gateway(tmp_path, config) as gateway:
        reader, writer = await open_raw(port_of(gateway))
        writer.transport.pause_reading()
        writer.write(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        await async_wait_until(lambda: upstream.requests == 1, what="the pool is taken")
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await exchange(port_of(gateway), b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n")
        assert response.status == 200
        # once the reader had stalled for STALL_EVICTION (0.5 s), not after the 5 s queue timeout
        assert loop.time() - started < 2.0
        assert _counter(gateway, "upstream_evictions_total", "app") == 1
        writer.transport.resume_reading()
        assert await _read_to_the_end(reader) < BIG
        await close_writer(writer)


async def test_a_reader_that_keeps_up_is_never_evicted(tmp_path: Path) -> None:
    """A request waiting on a pool held by a busy upstream (not a stalled client) waits."""
    async with faulty_upstreams("up") as [up]:
        config = _config(up.port, pool=_one_connection("3s"))
        async with running_gateway(tmp_path, config) as gateway:
            port = port_of(gateway)
            up.mode = "slow:1.5"
            first = asyncio.ensure_future(exchange(port, b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"))
            await async_wait_until(lambda: up.total == 1, what="the first request holds the pool")
            second = await exchange(port, b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
            assert ((await first).status, second.status) == (200, 200)
            assert _counter(gateway, "upstream_evictions_total", "app") == 0


async def test_connections_per_client_are_limited(
    tmp_path: Path, big: tuple[BigUpstream, int]
) -> None:
    _, port = big
    config = _config(port, limits={"max_connections_per_client": 3})
    async with running_gateway(tmp_path, config) as gateway:
        gw_port = port_of(gateway)
        held = [await open_raw(gw_port) for _ in range(3)]
        for _, writer in held:
            writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        for reader, _ in held:
            assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
        # the fourth is answered 503 and closed
        reader, writer = await open_raw(gw_port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        response = await asyncio.wait_for(read_response(reader), 5)
        assert_too_many_connections(response, "limits.max_connections_per_client")
        assert await is_closed(reader)
        await close_writer(writer)
        assert _counter(gateway, "connections_refused_total", "http", "per_client") == 1
        assert _counter(gateway, "connections_refused_total", "http", "max_connections") == 0
        # another address, and a trusted proxy (which carries many clients), are not limited
        for source in ("127.0.0.3", "127.0.0.2", "127.0.0.2", "127.0.0.2", "127.0.0.2"):
            r, w = await asyncio.open_connection("127.0.0.1", gw_port, local_addr=(source, 0))
            w.write(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert (await asyncio.wait_for(read_response(r), 5)).status == 200
            await close_writer(w)
        # a closed connection gives its place back
        _, first = held.pop()
        await close_writer(first)
        await async_wait_until(
            lambda: gateway.client_connections.get("127.0.0.1") == 2, what="the count drops"
        )
        reader, writer = await open_raw(gw_port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
        for _, w in [*held, (reader, writer)]:
            await close_writer(w)


async def test_waiting_requests_take_turns_by_client(tmp_path: Path) -> None:
    """Five requests of one client queued for a one-connection pool do not make another
    client's request wait behind all five."""
    async with faulty_upstreams("up") as [up]:
        config = _config(up.port, pool=_one_connection("10s"))
        async with running_gateway(tmp_path, config) as gateway:
            port = port_of(gateway)
            up.mode = "slow:0.3"
            order: list[str] = []

            async def request(name: str, source: str) -> None:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(source, 0)
                )
                writer.write(b"GET /%b HTTP/1.1\r\nHost: a\r\n\r\n" % name.encode())
                response = await asyncio.wait_for(read_response(reader), 10)
                assert response.status == 200
                order.append(name)
                await close_writer(writer)

            busy = [asyncio.ensure_future(request(f"a{i}", "127.0.0.1")) for i in range(5)]
            await async_wait_until(lambda: up.total == 1, what="a0 holds the pool")
            await request("b0", "127.0.0.3")
            await asyncio.gather(*busy)
            # b0 came after a0 and a1 were queued, but went right after the one in flight
            assert order.index("b0") <= 2, order


async def _trickle_upload(
    port: int, first: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A 1 MB upload: `first` bytes at once, then nothing until the caller sends more."""
    reader, writer = await open_raw(port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
    writer.write(b"u" * first)
    await writer.drain()
    return reader, writer


async def test_a_burst_then_a_trickle_is_slow_in_its_next_window(
    tmp_path: Path, big: tuple[BigUpstream, int]
) -> None:
    """Found by probing: 70 kB at once bought over a minute of near silence when the rate was
    an average since the start; each window of `grace` must bring the minimum rate."""
    upstream, port = big
    config = _config(port, limits=_min_rate("1KiB", "1s"))
    async with running_gateway(tmp_path, config) as gateway:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await _trickle_upload(port_of(gateway), 70_000)
        answer = asyncio.ensure_future(read_response(reader))
        while not answer.done() and loop.time() - started < 6:
            writer.write(b"u")  # a byte every 0.4 s: well inside body_timeout
            await asyncio.wait({answer}, timeout=0.4)
        response = await asyncio.wait_for(answer, 5)
        assert response.status == 408
        assert loop.time() - started < 3.5  # the second window, not 70 s later
        await close_writer(writer)
        assert upstream.requests == 1  # it had started streaming: 70 kB > request_buffering
        assert _counter(gateway, "slow_clients_total", "http", "upload") == 1


async def test_a_stalled_upload_gives_its_connection_to_a_waiting_request(
    tmp_path: Path, big: tuple[BigUpstream, int]
) -> None:
    upstream, port = big
    config = _config(port, pool=_one_connection("5s"))
    async with running_gateway(tmp_path, config) as gateway:
        reader, writer = await _trickle_upload(port_of(gateway), 70_000)
        await async_wait_until(lambda: upstream.requests == 1, what="the upload holds the pool")
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await exchange(port_of(gateway), b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n")
        assert response.status == 200
        assert loop.time() - started < 2.0  # not the 5 s queue timeout
        stalled = await asyncio.wait_for(read_response(reader), 5)
        assert stalled.status == 408
        assert "stalled while others waited" in json.loads(stalled.body)["detail"]
        await close_writer(writer)
        assert _counter(gateway, "upstream_evictions_total", "app") == 1


async def test_a_body_that_already_failed_opens_no_upstream_exchange(
    tmp_path: Path, big: tuple[BigUpstream, int]
) -> None:
    """Found by probing: a chunked body over the limit that arrived whole got its 413 only
    after its head had gone upstream."""
    upstream, port = big
    config = _config(port, limits={"max_body_bytes": 100})
    async with running_gateway(tmp_path, config) as gateway:
        response = await exchange(
            port_of(gateway),
            b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"65\r\n" + b"x" * 101 + b"\r\n0\r\n\r\n",
        )
        assert response.status == 413
        assert upstream.requests == 0
