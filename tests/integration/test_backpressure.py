"""Back-pressure: a client that reads slowly slows the upstream down instead of filling memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.app import Gateway
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import port_of, running_gateway
from tests.support.process import async_wait_until
from tests.support.raw import close_writer, open_raw, read_response

TOTAL = 48 * 1024 * 1024
CHUNK = 256 * 1024


class Pusher:
    """An upstream that answers 101 (or 200) and then writes TOTAL bytes as fast as it may."""

    def __init__(self) -> None:
        self.sent = 0
        self.done = asyncio.Event()
        self.may_read = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"PUT"):
            await self.slow_sink(reader, writer)
            return
        if b"upgrade: websocket" in head.lower():
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\n"
                b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            )
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % TOTAL)
        chunk = b"z" * CHUNK
        try:
            while self.sent < TOTAL:
                writer.write(chunk)
                await writer.drain()
                self.sent += CHUNK
            self.done.set()
            await reader.read()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def slow_sink(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Reads nothing until told to, then the whole body, then answers."""
        await self.may_read.wait()
        got = 0
        while got < TOTAL:
            data = await reader.read(1 << 20)
            if not data:
                break
            got += len(data)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(got)), got))
        await writer.drain()
        writer.close()


@pytest.fixture
async def pushing(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Pusher]]:
    pusher = Pusher()
    server = await asyncio.start_server(pusher.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = gateway_yaml(
        limits={"body_timeout": "30s"},
        upstreams={"push": upstream_to(f"http://127.0.0.1:{port}")},
        routes=[route("push", "push", websocket=True, max_body_bytes="64MiB")],
    )
    async with running_gateway(tmp_path, config) as gateway:
        yield gateway, pusher
    server.close()


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ],
    ids=["response-body", "tunnel"],
)
async def test_slow_reader_holds_the_upstream_back(
    pushing: tuple[Gateway, Pusher], request_head: bytes
) -> None:
    gateway, pusher = pushing
    reader, writer = await open_raw(port_of(gateway))
    writer.transport.pause_reading()
    writer.write(request_head)
    await async_wait_until(lambda: pusher.sent > 0, what="upstream started")
    # give the upstream every chance to push everything; with back-pressure it cannot
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(pusher.done.wait(), 1.0)
    assert pusher.sent < TOTAL // 2
    writer.transport.resume_reading()
    received = 0
    head = await reader.readuntil(b"\r\n\r\n")
    while received < TOTAL:
        data = await asyncio.wait_for(reader.read(1 << 20), 10)
        assert data, "connection closed early"
        received += len(data)
    assert head.split(b" ")[1] in (b"200", b"101")
    assert received == TOTAL
    await close_writer(writer)


async def test_slow_upstream_holds_the_uploading_client_back(
    pushing: tuple[Gateway, Pusher],
) -> None:
    gateway, pusher = pushing
    reader, writer = await open_raw(port_of(gateway))
    writer.write(b"PUT /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % TOTAL)
    chunk = b"u" * CHUNK
    accepted = 0

    async def upload() -> None:
        nonlocal accepted
        while accepted < TOTAL:
            writer.write(chunk)
            await writer.drain()
            accepted += CHUNK

    uploading = asyncio.ensure_future(upload())
    # the upstream reads nothing: the gateway must stop reading the client after its buffers
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(uploading), 1.0)
    assert accepted < TOTAL // 2
    pusher.may_read.set()
    await asyncio.wait_for(uploading, 20)
    response = await asyncio.wait_for(read_response(reader), 10)
    assert response.status == 200
    assert response.body == str(TOTAL).encode()  # the upstream got every byte
    await close_writer(writer)
