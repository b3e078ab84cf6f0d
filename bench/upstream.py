"""A fast fixed-body upstream on the gateway's own raw-protocol core (used when nginx is absent).

Run: python -m bench.upstream PORT [BODY_BYTES]
Answers every request with 200 and a fixed body; `/big?size=N` streams N bytes; request
bodies are read and dropped; `/headers` answers with the large-headers scenario's 15 extra
response headers.
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

from bench.headers import raw_response_headers

_CHUNK = b"x" * 65536


class Fixed(asyncio.Protocol):
    def __init__(self, body: bytes) -> None:
        self.response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        # the large-headers scenario's answer: the same body after 15 more header lines
        self.with_headers = b"HTTP/1.1 200 OK\r\n%bContent-Length: %d\r\n\r\n%b" % (
            raw_response_headers(),
            len(body),
            body,
        )
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.writable: asyncio.Event | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pause_writing(self) -> None:
        self.writable = asyncio.Event()

    def resume_writing(self) -> None:
        if self.writable is not None:
            self.writable.set()
            self.writable = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_body(self, body: bytes) -> None:
        pass  # uploads are read and dropped

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        assert self.transport is not None
        if self.url.startswith(b"/big"):
            size = int(self.url.split(b"size=")[1]) if b"size=" in self.url else 1 << 20
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            asyncio.get_running_loop().create_task(self._stream(size))
        elif self.url.startswith(b"/headers"):
            self.transport.write(self.with_headers)
        else:
            self.transport.write(self.response)

    async def _stream(self, size: int) -> None:
        transport = self.transport
        assert transport is not None
        sent = 0
        while sent < size and not transport.is_closing():
            part = _CHUNK[: min(len(_CHUNK), size - sent)]
            transport.write(part)
            sent += len(part)
            if self.writable is not None:
                await self.writable.wait()  # the reader is slow: wait for the buffer to drain


async def main(port: int, body: bytes) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Fixed(body), "127.0.0.1", port, backlog=4096)
    await server.serve_forever()


if __name__ == "__main__":
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    uvloop.run(main(int(sys.argv[1]), b"x" * size))
