"""What a chunked body may cost beyond its own bytes (found by probing): an endless trailer was
buffered without bound — and in quadratic time — and a body in one-byte chunks cost a callback
per byte.  Framing and trailers may now be at most `max_header_bytes` more than the body."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from tests.integration.conftest import Seen
from tests.support.gateway import port_of
from tests.support.raw import close_writer, exchange, open_raw, read_response

HEAD = b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


async def _send_until_answered(gw: Gateway, pieces: list[bytes]) -> tuple[int, str, int]:
    """Send `pieces` one by one until the gateway answers: (status, detail, bytes sent)."""
    reader, writer = await open_raw(port_of(gw))
    answer = asyncio.ensure_future(read_response(reader))
    sent = 0
    try:
        for piece in [HEAD, *pieces]:
            if answer.done():
                break
            writer.write(piece)
            sent += len(piece)
            await writer.drain()
    except ConnectionError:
        pass
    response = await asyncio.wait_for(answer, 5)
    await close_writer(writer)
    return response.status, json.loads(response.body)["detail"], sent


async def test_an_endless_trailer_is_refused_early(gw: Gateway) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    pieces = [b"1\r\na\r\n0\r\nX-Trailer: "] + [b"a" * 4096] * 2000  # 8 MiB, were it all sent
    status, detail, _ = await _send_until_answered(gw, pieces)
    assert status == 400
    assert "trailers" in detail
    # refused on the spot, not by a timeout or the minimum data rate seconds later
    assert loop.time() - started < 1.5


async def test_a_body_of_one_byte_chunks_is_refused(gw: Gateway) -> None:
    pieces = [b"1\r\nx\r\n" * 1000] * 200  # 1.2 MB of framing for 200 kB of body
    status, detail, _ = await _send_until_answered(gw, pieces)
    assert status == 400
    assert "chunk framing" in detail


@pytest.mark.parametrize("chunk", [8, 64, 4096], ids=["8B", "64B", "4KiB"])
async def test_ordinary_chunk_sizes_pass(
    chunk: int, gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    total = 200_000
    body = b"".join(
        b"%x\r\n%b\r\n" % (len(part), part)
        for part in (b"c" * min(chunk, total - i) for i in range(0, total, chunk))
    )
    response = await exchange(port_of(gw), HEAD + body + b"0\r\nX-Checksum: 1\r\n\r\n", within=10)
    assert response.status == 200
    assert response.body == str(total).encode()
