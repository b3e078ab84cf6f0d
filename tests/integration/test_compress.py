"""The `compress` stage over real sockets: real upstream responses of several sizes, types and
framings decompressed by the client and compared byte for byte; what is never compressed; the
headers (Vary, ETag, Content-Encoding, framing); a large body that stays streamed (its first
bytes decoded before the upstream sent the rest); metrics, the access log and a reload."""

from __future__ import annotations

import asyncio
import json
import random
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import brotli
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import port_of, running_gateway, write_config
from tests.support.metrics import Samples, scrape
from tests.support.raw import RawResponse, close_writer, exchange, open_raw, read_response

GATE = web.AppKey("gate", asyncio.Event)


def text_of(size: int, seed: int = 1) -> bytes:
    """Compressible but not trivial: words drawn at random."""
    rng = random.Random(seed)
    words = [b"gateway", b"upstream", b"stream", b"chunk", b"route", b"brotli", b"gzip", b"<p>"]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


async def _fixed(request: web.Request) -> web.Response:
    size = int(request.match_info["size"])
    kind = request.query.get("type", "text/html")
    headers = {"ETag": '"abc"', "Accept-Ranges": "bytes", "Vary": "Origin"}
    return web.Response(body=text_of(size), content_type=kind, headers=headers)


async def _chunked(request: web.Request) -> web.StreamResponse:
    size = int(request.match_info["size"])
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    body = text_of(size, seed=2)
    for start in range(0, len(body), 10_000):
        await response.write(body[start : start + 10_000])
    await response.write_eof()
    return response


async def _held(request: web.Request) -> web.StreamResponse:
    """The first 200 kB at once, the rest only after the test saw the first bytes decoded."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(text_of(200_000, seed=3))
    await request.app[GATE].wait()
    await response.write(text_of(300_000, seed=4))
    await response.write_eof()
    return response


async def _special(request: web.Request) -> web.Response:
    what = request.match_info["what"]
    body = text_of(20_000)
    if what == "encoded":
        return web.Response(
            body=zlib.compress(body),
            content_type="text/html",
            headers={"Content-Encoding": "deflate"},
        )
    if what == "no-transform":
        return web.Response(
            body=body, content_type="text/html", headers={"Cache-Control": "public, no-transform"}
        )
    if what == "partial":
        return web.Response(
            status=206,
            body=body[:5000],
            content_type="text/html",
            headers={"Content-Range": f"bytes 0-4999/{len(body)}"},
        )
    if what == "not-modified":
        return web.Response(status=304, headers={"ETag": '"abc"'})
    raise web.HTTPNotFound()


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[int, asyncio.Event]]:
    app = web.Application()
    gate = asyncio.Event()
    app[GATE] = gate
    app.router.add_route("*", "/fixed/{size}", _fixed)
    app.router.add_get("/chunked/{size}", _chunked)
    app.router.add_get("/held", _held)
    app.router.add_get("/special/{what}", _special)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        assert server.port is not None
        yield server.port, gate
    finally:
        gate.set()
        await server.close()


def _config(port: int, compress: dict[str, Any] | None = None, **sections: Any) -> str:
    return gateway_yaml(
        upstreams={"app": upstream_to(f"http://127.0.0.1:{port}")},
        routes=[route("site", "app", "/", pipeline=[{"compress": compress or {}}])],
        **sections,
    )


async def _get(
    gw: Gateway, path: str, *headers: tuple[str, str], method: str = "GET"
) -> RawResponse:
    lines = "".join(f"{n}: {v}\r\n" for n, v in headers)
    request = f"{method} {path} HTTP/1.1\r\nHost: site\r\n{lines}\r\n"
    if method == "HEAD":
        reader, writer = await open_raw(port_of(gw))
        try:
            writer.write(request.encode("latin-1"))
            return await asyncio.wait_for(read_response(reader, head_request=True), 5)
        finally:
            await close_writer(writer)
    return await exchange(port_of(gw), request.encode("latin-1"), within=15)


def _counted(samples: Samples, outcome: str) -> float:
    """gateway_stage_total for the route's compress stage (0 before its first count)."""
    labels = (("outcome", outcome), ("route", "site"), ("stage", "compress"))
    return samples.get(("gateway_stage_total", labels), 0.0)


def streaming_decoder(coding: str) -> Callable[[bytes], bytes]:
    """Decodes a body piece by piece, as a browser does, returning all it can so far."""
    if coding == "gzip":
        return zlib.decompressobj(31).decompress
    d = brotli.Decompressor()

    def decode(data: bytes) -> bytes:
        out = d.process(data)
        # brotli 1.2's binding hands out at most ~32 KiB a call (can_accept_more_data says
        # True all the same): ask again with no input until nothing more comes
        while True:
            more = d.process(b"")
            if not more:
                return bytes(out)
            out += more

    return decode


def decoded(response: RawResponse) -> bytes:
    coding = response.header("content-encoding")
    if coding == "gzip":
        z = zlib.decompressobj(31)
        data = z.decompress(response.body)
        assert z.eof, "a gzip stream that was not finished"
        return data
    if coding == "br":
        return bytes(brotli.decompress(response.body))
    assert coding is None
    return response.body


@pytest.mark.parametrize("coding", ["br", "gzip"])
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("/fixed/5000", text_of(5000), id="small-whole"),
        pytest.param("/fixed/3000000", text_of(3_000_000), id="large-fixed"),
        pytest.param("/chunked/500", text_of(500, seed=2), id="tiny-chunked"),
        pytest.param("/chunked/1500000", text_of(1_500_000, seed=2), id="large-chunked"),
        pytest.param("/fixed/4000?type=image/svg%2Bxml", text_of(4000), id="svg"),
    ],
)
async def test_bodies_round_trip_through_the_coding(
    tmp_path: Path, upstream: tuple[int, asyncio.Event], coding: str, path: str, expected: bytes
) -> None:
    port, _ = upstream
    async with running_gateway(tmp_path, _config(port)) as gw:
        response = await _get(gw, path, ("Accept-Encoding", f"{coding}, identity;q=0.5"))
        assert response.status == 200
        if len(expected) < 1024:
            # chunked upstream, but it arrived whole with the head: its size is known, and small
            assert response.header("content-encoding") is None
            assert response.body == expected
            return
        assert response.header("content-encoding") == coding
        assert decoded(response) == expected
        assert len(response.body) < len(expected) or len(expected) < 1000
        assert "Accept-Encoding" in (response.header("vary") or "")
        if path.startswith("/fixed"):
            assert response.header("etag") == 'W/"abc"'
            assert response.header("accept-ranges") is None
            assert response.header("vary") == "Origin, Accept-Encoding"
        if len(expected) > 1_000_000:
            # a streamed body: re-framed chunked, its length unknown before the end
            assert response.header("transfer-encoding") == "chunked"
            assert response.header("content-length") is None
        else:
            # a body here whole is compressed at once and sent with its new length
            assert response.header("content-length") == str(len(response.body))


@pytest.mark.parametrize(
    ("path", "headers", "method"),
    [
        pytest.param("/fixed/500", [("Accept-Encoding", "gzip")], "GET", id="below-min_bytes"),
        pytest.param(
            "/fixed/5000?type=image/png", [("Accept-Encoding", "gzip")], "GET", id="other-type"
        ),
        pytest.param("/special/encoded", [("Accept-Encoding", "gzip")], "GET", id="encoded"),
        pytest.param(
            "/special/no-transform", [("Accept-Encoding", "gzip")], "GET", id="no-transform"
        ),
        pytest.param(
            "/special/partial",
            [("Accept-Encoding", "gzip"), ("Range", "bytes=0-4999")],
            "GET",
            id="range",
        ),
        pytest.param(
            "/special/not-modified",
            [("Accept-Encoding", "gzip"), ("If-None-Match", '"abc"')],
            "GET",
            id="304",
        ),
        pytest.param("/fixed/5000", [("Accept-Encoding", "gzip")], "HEAD", id="head"),
        pytest.param("/fixed/5000", [], "GET", id="no-accept-encoding"),
        pytest.param("/fixed/5000", [("Accept-Encoding", "gzip;q=0, br;q=0")], "GET", id="q0"),
    ],
)
async def test_what_is_never_compressed(
    tmp_path: Path,
    upstream: tuple[int, asyncio.Event],
    path: str,
    headers: list[tuple[str, str]],
    method: str,
) -> None:
    port, _ = upstream
    async with running_gateway(tmp_path, _config(port)) as gw:
        response = await _get(gw, path, *headers, method=method)
        direct = await _get_direct(port, path, headers, method)
        assert response.status == direct.status
        assert response.body == direct.body
        assert response.header("content-encoding") == direct.header("content-encoding")
        assert response.header("etag") == direct.header("etag")
        assert response.header("content-length") == direct.header("content-length")
        samples = await scrape(gw)
        accepted = any(n == "Accept-Encoding" and "q=0" not in v for n, v in headers)
        outcome = "not_accepted" if not accepted and method == "GET" else None
        counted = {o: _counted(samples, o) for o in ("skipped", "not_accepted", "br", "gzip")}
        assert counted["br"] == counted["gzip"] == 0
        assert counted["skipped"] + counted["not_accepted"] == 1
        if outcome is not None:
            assert counted["not_accepted"] == 1
            # the response could be compressed for another client: caches must key on it
            assert response.header("vary") == "Origin, Accept-Encoding"


async def _get_direct(
    port: int, path: str, headers: list[tuple[str, str]], method: str
) -> RawResponse:
    """The same request straight to the upstream, to compare with."""
    lines = "".join(f"{n}: {v}\r\n" for n, v in headers)
    request = f"{method} {path} HTTP/1.1\r\nHost: site\r\n{lines}\r\n".encode("latin-1")
    reader, writer = await open_raw(port)
    try:
        writer.write(request)
        from tests.support.raw import read_response

        return await asyncio.wait_for(read_response(reader, head_request=method == "HEAD"), 5)
    finally:
        await close_writer(writer)


@pytest.mark.parametrize("coding", ["br", "gzip"])
async def test_a_streamed_body_stays_streamed(
    tmp_path: Path, upstream: tuple[int, asyncio.Event], coding: str
) -> None:
    """The first 200 kB are decoded by the client while the upstream holds the rest back: the
    stage neither buffers the body nor holds back what it compressed."""
    port, gate = upstream
    async with running_gateway(tmp_path, _config(port)) as gw:
        reader, writer = await open_raw(port_of(gw))
        try:
            writer.write(
                f"GET /held HTTP/1.1\r\nHost: site\r\nAccept-Encoding: {coding}\r\n\r\n".encode()
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert b"Content-Encoding: " + coding.encode() in head
            assert b"Transfer-Encoding: chunked" in head
            decode = streaming_decoder(coding)
            first = text_of(200_000, seed=3)
            seen = b""
            while len(seen) < len(first):
                size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).strip(), 16)
                assert size > 0, "the body ended before the upstream sent its second part"
                seen += decode(await reader.readexactly(size))
                await reader.readexactly(2)
            assert seen == first  # all of it, before the upstream sent another byte
            gate.set()
            while True:
                size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).strip(), 16)
                if size == 0:
                    await reader.readexactly(2)
                    break
                seen += decode(await reader.readexactly(size))
                await reader.readexactly(2)
            assert seen == first + text_of(300_000, seed=4)
        finally:
            await close_writer(writer)


async def test_metrics_access_log_and_a_reload(
    tmp_path: Path, upstream: tuple[int, asyncio.Event], capfd: pytest.CaptureFixture[str]
) -> None:
    port, _ = upstream
    async with running_gateway(tmp_path, _config(port, access_log={"enabled": True})) as gw:
        response = await _get(gw, "/fixed/5000", ("Accept-Encoding", "gzip, br"))
        assert response.header("content-encoding") == "br"
        await _get(gw, "/fixed/5000?type=image/png", ("Accept-Encoding", "gzip, br"))
        samples = await scrape(gw)
        for outcome, count in (("br", 1), ("skipped", 1), ("gzip", 0)):
            assert _counted(samples, outcome) == count
        # live: gzip only from now on; an invalid change is refused whole
        write_config(tmp_path, _config(port, {"encodings": ["gzip"]}, access_log={"enabled": True}))
        assert (await gw.reload())["ok"] is True
        response = await _get(gw, "/fixed/5000", ("Accept-Encoding", "gzip, br"))
        assert response.header("content-encoding") == "gzip"
        assert decoded(response) == text_of(5000)
        write_config(tmp_path, _config(port, {"encodings": ["zstd"]}, access_log={"enabled": True}))
        result = await gw.reload()
        assert result["ok"] is False
        assert "routes[0].pipeline[0].compress.encodings[0]: unknown coding 'zstd'" in str(
            result["error"]
        )
        gw.snapshot.access_log.flush()
    lines = [json.loads(x) for x in capfd.readouterr().out.splitlines() if x.startswith("{")]
    stages = [x.get("stages") for x in lines if x.get("route") == "site"]
    assert stages == [{"compress": "br"}, {"compress": "skipped"}, {"compress": "gzip"}]
