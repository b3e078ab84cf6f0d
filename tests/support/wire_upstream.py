"""An upstream that shows the wire: every request's header lines exactly as they arrived, and
answers with bytes the test writes.

`WireUpstream.response` is the whole response sent to each request (status line, header lines in
any case and order, framing, body), so a test can send what aiohttp would normalize or refuse to
write; `answers` queues responses that go first, one per request, in order.  Each request is
recorded with its header lines as (name, value) byte pairs, unchanged, its de-chunked body and
the peer port of the connection it came on (the gateway's pooled connection).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from tests.support.raw_server import RawServer


@dataclass(frozen=True)
class WireRequest:
    request_line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    peer_port: int

    def named(self, name: str) -> list[tuple[bytes, bytes]]:
        """The header lines whose name is `name`, compared ignoring case."""
        low = name.lower().encode("latin-1")
        return [(n, v) for n, v in self.headers if n.lower() == low]


def parse_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The first line and the header lines of a head, names and values as sent (OWS trimmed)."""
    first, *lines = head.split(b"\r\n")
    headers = []
    for line in lines:
        if line:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip(b" \t")))
    return first, headers


class WireUpstream(RawServer):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[WireRequest] = []
        self.response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        #: answers to the next requests, one each, before `response` answers the rest
        self.answers: deque[bytes] = deque()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_port = writer.get_extra_info("peername")[1]
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            first, headers = parse_head(head[:-4])
            fields = {n.lower(): v for n, v in headers}
            if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
                body = await _read_chunked(reader)
            else:
                body = await reader.readexactly(int(fields.get(b"content-length", b"0")))
            self.requests.append(WireRequest(first, headers, body, peer_port))
            writer.write(self.answers.popleft() if self.answers else self.response)
            await writer.drain()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailer lines
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


@asynccontextmanager
async def wire_upstream() -> AsyncIterator[WireUpstream]:
    upstream = WireUpstream()
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()
