"""Raw-socket HTTP clients for conformance tests: bytes in, bytes out, nothing normalized."""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, field


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes = b""
    extra: list[RawResponse] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None


async def open_raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_response(reader: asyncio.StreamReader, *, head_request: bool = False) -> RawResponse:
    """Read one response, framing by Content-Length, chunked, or until close."""
    raw_head = await reader.readuntil(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    match = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    assert match, lines[0]
    status = int(match.group(1))
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
    response = RawResponse(status, headers, b"", raw_head)
    if head_request or status in (204, 304) or 100 <= status < 200:
        return response
    length = response.header("content-length")
    if response.header("transfer-encoding") == "chunked":
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        response.body = bytes(body)
    elif length is not None:
        response.body = await reader.readexactly(int(length))
    else:
        response.body = await reader.read()
    return response


async def exchange(port: int, data: bytes, *, within: float = 5.0) -> RawResponse:
    """Send `data` on a fresh connection and read one response."""
    reader, writer = await open_raw(port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), within)
    finally:
        await close_writer(writer)


async def is_closed(reader: asyncio.StreamReader, within: float = 5.0) -> bool:
    """True when the peer closed the connection (EOF) within `timeout`."""
    try:
        data = await asyncio.wait_for(reader.read(1), within)
    except (ConnectionResetError, BrokenPipeError):
        return True
    return data == b""


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Close a client connection and wait until its transport is gone."""
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()
