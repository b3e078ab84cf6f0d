"""Raw bytes on a socket: request-smuggling shapes and malformed requests (SPEC §3, §4).

Each case checks the status, that the connection is closed when it must be, what the upstream
actually received, and that the gateway keeps serving other clients meanwhile.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from tests.integration.conftest import Seen
from tests.support.gateway import port_of
from tests.support.raw import close_writer, exchange, is_closed, open_raw, read_response

SMUGGLING = {
    "cl_and_te": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    "te_and_cl": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    "duplicate_cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc",
    "cl_list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
    "cl_plus": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
    "cl_negative": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    "bad_chunk_size": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "chunk_size_overflow": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"ffffffffffffffffff1\r\nabc\r\n0\r\n\r\n",
    "chunk_lf_only": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
    "te_not_chunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
    "te_identity_chunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
    "te_xchunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
    "te_space_name": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te_in_http10": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
    "bare_lf": b"GET / HTTP/1.1\nHost: a\n\n",
    "bare_cr": b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n",
    "bad_header_name": b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n",
    "ctl_in_value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n",
    "nul_in_target": b"GET /a\x00b HTTP/1.1\r\nHost: a\r\n\r\n",
    "two_hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "missing_host": b"GET / HTTP/1.1\r\n\r\n",
    "http09": b"GET /\r\n\r\n",
    "http2_version": b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    "connect": b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    "encoded_slash": b"GET /api%2Fadmin HTTP/1.1\r\nHost: a\r\n\r\n",
    "encoded_backslash": b"GET /api%5cadmin HTTP/1.1\r\nHost: a\r\n\r\n",
    "encoded_nul": b"GET /api%00 HTTP/1.1\r\nHost: a\r\n\r\n",
    "dotdot_above_root": b"GET /../etc HTTP/1.1\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
async def test_malformed_request_is_400_and_closed(
    name: str, gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    _, seen = upstream
    port = port_of(gw)
    reader, writer = await open_raw(port)
    writer.write(SMUGGLING[name])
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 400, name
    assert response.header("content-type") == "application/problem+json"
    assert json.loads(response.body)["code"] == "bad_request"
    assert response.header("connection") == "close"
    assert await is_closed(reader)
    await close_writer(writer)
    # nothing smuggled reached the upstream, and the gateway keeps serving
    assert not any(r["path"] == "/smuggled" for r in seen.requests)
    assert seen.requests == []
    ok = await exchange(port, b"GET /still-up HTTP/1.1\r\nHost: a\r\n\r\n")
    assert ok.status == 200


SPELLINGS = ["/./ro/x", "/y/../ro/x", "/%2e/ro/x", "//ro/x", "/ro/./x", "/%72o/x", "/ro//x"]


@pytest.mark.parametrize("spelling", SPELLINGS)
async def test_path_spellings_route_like_their_normal_form(
    spelling: str, gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    """A route cannot be reached under another name: /ro only allows GET, whatever the spelling."""
    _, seen = upstream
    port = port_of(gw)
    response = await exchange(port, f"DELETE {spelling} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    assert response.status == 405
    response = await exchange(port, f"GET {spelling} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    assert response.status == 200
    # the upstream receives exactly the normalized path that was routed
    assert seen.requests[-1]["path"] == "/ro/x"


async def test_absolute_form_does_not_override_host(
    gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    _, seen = upstream
    response = await exchange(
        port_of(gw), b"GET http://evil.example/ro/x HTTP/1.1\r\nHost: good.test\r\n\r\n"
    )
    assert response.status == 200
    assert seen.requests[-1]["path"] == "/ro/x"
    headers = {k.lower(): v for k, v in seen.requests[-1]["headers"]}
    assert headers[b"host"] == b"good.test"


async def test_trailers_never_merge_into_the_next_pipelined_request(
    gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    _, seen = upstream
    reader, writer = await open_raw(port_of(gw))
    writer.write(
        b"POST /first HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\nX-Injected: 1\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
        b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    first = await asyncio.wait_for(read_response(reader), 5)
    second = await asyncio.wait_for(read_response(reader), 5)
    await close_writer(writer)
    assert first.body == b"POST /first 2"
    assert second.body == b"GET /second 0"
    for request in seen.requests:
        headers = {k.lower(): v for k, v in request["headers"]}
        assert b"x-injected" not in headers
        assert headers[b"x-forwarded-for"] == b"127.0.0.1"


async def test_oversized_head_is_431(gw: Gateway) -> None:
    port = port_of(gw)
    big = b"X-Big: " + b"a" * 40000 + b"\r\n"
    reader, writer = await open_raw(port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n" + big + b"\r\n")
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 431
    assert json.loads(response.body)["code"] == "headers_too_large"
    assert await is_closed(reader)
    await close_writer(writer)


async def test_never_ending_header_is_431(gw: Gateway) -> None:
    reader, writer = await open_raw(port_of(gw))
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Endless: ")
    for _ in range(20):
        writer.write(b"b" * 8192)
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 431
    await close_writer(writer)


async def test_body_over_limit_is_413(gw: Gateway, upstream: tuple[TestServer, Seen]) -> None:
    _, seen = upstream
    port = port_of(gw)
    response = await exchange(
        port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\n" + b"z" * 1000
    )
    assert response.status == 413
    assert seen.requests == []  # refused before anything went upstream
    # a chunked body is cut off when it passes the limit
    reader, writer = await open_raw(port)
    writer.write(b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%b\r\n" % (65536, b"q" * 65536)
    response_task = asyncio.ensure_future(read_response(reader))
    try:
        for _ in range(20):
            writer.write(chunk)
            await writer.drain()
            if response_task.done():
                break
    except ConnectionError:
        pass
    response = await asyncio.wait_for(response_task, 5)
    await close_writer(writer)
    assert response.status == 413


#: (version, a header line or b"") -> what the answer must show: the Connection header it
#: carries (None: none, HTTP/1.1 kept alive) and whether the connection stays open.  llhttp
#: decides keep-alive from Connection and Proxy-Connection alike, and the gateway reads the
#: version from that decision when neither header came, so every spelling is a case here.
CONNECTION_CASES = {
    ("1.1", b""): (None, True),
    ("1.1", b"Connection: keep-alive\r\n"): (None, True),
    ("1.1", b"Connection: close\r\n"): ("close", False),
    ("1.1", b"Proxy-Connection: keep-alive\r\n"): (None, True),
    ("1.1", b"Proxy-Connection: close\r\n"): ("close", False),
    ("1.0", b""): ("close", False),
    ("1.0", b"Connection: keep-alive\r\n"): ("keep-alive", True),
    ("1.0", b"Connection: Keep-Alive, x-other\r\n"): ("keep-alive", True),
    ("1.0", b"Proxy-Connection: keep-alive\r\n"): ("keep-alive", True),
    ("1.0", b"Connection: close\r\n"): ("close", False),
    ("1.0", b"Proxy-Connection: close\r\n"): ("close", False),
}


@pytest.mark.parametrize(("version", "line"), sorted(CONNECTION_CASES))
async def test_version_and_keep_alive_by_every_connection_spelling(
    version: str, line: bytes, gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    _, seen = upstream
    expected_header, stays_open = CONNECTION_CASES[(version, line)]
    reader, writer = await open_raw(port_of(gw))
    request = b"GET /v HTTP/%b\r\nHost: a\r\n%b\r\n" % (version.encode(), line)
    writer.write(request)
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 200
    assert response.header("connection") == expected_header
    assert response.header("transfer-encoding") is None or version == "1.1"
    if stays_open:
        writer.write(request)
        again = await asyncio.wait_for(read_response(reader), 5)
        assert again.status == 200
        assert len(seen.requests) == 2
    else:
        assert await is_closed(reader)
        assert len(seen.requests) == 1
    await close_writer(writer)


@pytest.mark.parametrize("version", [b"2.0", b"0.9"])
@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"Connection: keep-alive\r\n",
        b"Proxy-Connection: keep-alive\r\n",
        b"Connection: close\r\n",
    ],
)
async def test_unsupported_version_is_400_whatever_keeps_it_alive(
    version: bytes, line: bytes, gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    _, seen = upstream
    reader, writer = await open_raw(port_of(gw))
    writer.write(b"GET /v HTTP/%b\r\nHost: a\r\n%b\r\n" % (version, line))
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 400
    assert json.loads(response.body)["detail"] == f"HTTP/{version.decode()} is not supported"
    assert await is_closed(reader)
    await close_writer(writer)
    assert seen.requests == []
