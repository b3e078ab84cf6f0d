"""The `mirror` stage over real sockets: a main and a mirror upstream that record what they get;
the client's answer never waits on the mirror (hanging, resetting), bodies below and above
`max_body_bytes` (Content-Length and chunked), `max_in_flight`, `sample_ratio: 0`, the mark a
copy carries, a reload cancelling the replaced stage's copies, and shutdown leaving none."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.stages.mirror import MirrorStage
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import port_of, running_gateway, write_config
from tests.support.metrics import scrape
from tests.support.raw import RawResponse, exchange

#: generous bound for anything to happen on loopback (never a measure of speed)
DEADLINE = 10.0


@dataclass
class Recorder:
    """A loopback HTTP/1.1 upstream that keeps each request's head and body; `mode` says how it
    answers: "ok" (200), "hang" (never answers, until the connection is closed), "reset" (closes
    the connection as soon as the request has arrived)."""

    mode: str = "ok"
    heads: list[dict[str, str]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    #: connections that ended (the peer closed them) while the upstream held a request
    closed_while_held: int = 0
    port: int = 0
    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = raw.decode("latin-1").split("\r\n")
                head = {"request-line": lines[0]}
                for line in lines[1:]:
                    if line:
                        name, _, v = line.partition(":")
                        head[name.strip().lower()] = v.strip()
                body = await _read_body(reader, head)
                self.heads.append(head)
                self.bodies.append(body)
                if self.mode == "reset":
                    writer.transport.abort()
                    return
                if self.mode == "hang":
                    await reader.read()  # until the gateway gives up on it
                    self.closed_while_held += 1
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmain")
                await writer.drain()
        finally:
            writer.close()


async def _read_body(reader: asyncio.StreamReader, head: dict[str, str]) -> bytes:
    if head.get("transfer-encoding") == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return bytes(body)
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    return await reader.readexactly(int(head.get("content-length", "0")))


@contextlib.asynccontextmanager
async def recording(mode: str = "ok") -> AsyncIterator[Recorder]:
    recorder = Recorder(mode)
    server = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
    recorder.server = server
    recorder.port = server.sockets[0].getsockname()[1]
    try:
        yield recorder
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


@pytest.fixture
async def main() -> AsyncIterator[Recorder]:
    async with recording() as r:
        yield r


def _config(main: Recorder, mirror: Recorder, **mirror_options: Any) -> str:
    return gateway_yaml(
        upstreams={
            "app": upstream_to(f"http://127.0.0.1:{main.port}"),
            "shadow": upstream_to(f"http://127.0.0.1:{mirror.port}"),
        },
        routes=[
            route(
                "api",
                "app",
                "/",
                timeout="30s",
                pipeline=[{"mirror": {"upstream": "shadow", **mirror_options}}],
            )
        ],
    )


async def _poll(condition: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    """Wait until `condition` holds, failing after DEADLINE."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def _counted(gw: Gateway, outcome: str) -> float:
    samples = await scrape(gw)
    key = ("gateway_stage_total", (("outcome", outcome), ("route", "api"), ("stage", "mirror")))
    return samples.get(key, 0.0)


async def _until_counted(gw: Gateway, outcome: str, count: float) -> None:
    async def reached() -> bool:
        return await _counted(gw, outcome) == count

    await _poll(reached, f"{count} {outcome}")


async def _admin_upstreams(gw: Gateway) -> list[dict[str, Any]]:
    assert gw.admin is not None
    url = f"http://127.0.0.1:{gw.admin.port}/admin/upstreams"
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        assert r.status == 200
        described: list[dict[str, Any]] = await r.json()
    return described


def _stage(gw: Gateway) -> MirrorStage:
    stages = [s for _, s in gw.snapshot.stages.values() if isinstance(s, MirrorStage)]
    assert len(stages) == 1
    return stages[0]


async def _post(gw: Gateway, body: bytes, *headers: str) -> RawResponse:
    extra = "".join(f"{h}\r\n" for h in headers)
    request = (
        f"POST /orders?x=1 HTTP/1.1\r\nHost: api.example\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    return await exchange(port_of(gw), request, within=DEADLINE)


async def _post_chunked(gw: Gateway, chunks: list[bytes]) -> RawResponse:
    framed = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    request = b"POST /upload HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n" + framed
    return await exchange(port_of(gw), request, within=DEADLINE)


async def test_both_upstreams_get_the_request_and_the_copy_is_marked(
    tmp_path: Path, main: Recorder
) -> None:
    async with (
        recording() as mirror,
        running_gateway(tmp_path, _config(main, mirror)) as gw,
    ):
        # a client's own mark is not believed: only the gateway's reaches the mirror
        response = await _post(gw, b'{"id": 7}', "X-Mirror: forged", "X-Custom: a")
        assert response.status == 200
        assert response.body == b"main"
        await _until_counted(gw, "mirrored", 1)
        assert main.bodies == [b'{"id": 7}']
        assert mirror.bodies == [b'{"id": 7}']
        copy = mirror.heads[0]
        assert copy["request-line"] == "POST /orders?x=1 HTTP/1.1"
        assert copy["x-mirror"] == "1"
        assert copy["x-custom"] == "a"
        assert copy["host"] == "api.example"
        assert copy["content-length"] == "9"
        # the main upstream's request is the client's, unmarked by the gateway
        assert main.heads[0]["x-mirror"] == "forged"
        # a request without a body is copied too
        get = b"GET /a HTTP/1.1\r\nHost: api\r\n\r\n"
        assert (await exchange(port_of(gw), get, within=DEADLINE)).status == 200
        await _until_counted(gw, "mirrored", 2)
        assert mirror.heads[1]["request-line"] == "GET /a HTTP/1.1"
        assert "content-length" not in mirror.heads[1]


async def test_a_hanging_mirror_never_delays_the_client(tmp_path: Path, main: Recorder) -> None:
    async with (
        recording("hang") as mirror,
        running_gateway(tmp_path, _config(main, mirror)) as gw,
    ):
        # the copy goes first (it is started before the main request), then hangs there
        response = await _post(gw, b"payload")
        assert response.status == 200
        assert response.body == b"main"
        await _poll(lambda: len(mirror.bodies) == 1, "the copy at the mirror")
        # the client already had its answer while the mirror still holds the copy
        assert len(_stage(gw).tasks) == 1
        # /admin/upstreams shows the copies under way on the mirror upstream
        described = {u["name"]: u for u in await _admin_upstreams(gw)}
        assert described["shadow"]["mirrors"] == [
            {"stage": "api", "sample_ratio": 1.0, "in_flight": 1, "max_in_flight": 100}
        ]
        assert described["app"]["mirrors"] == []
        assert mirror.closed_while_held == 0
        # and the next client too
        assert (await _post(gw, b"again")).status == 200
        assert main.bodies == [b"payload", b"again"]
        stage = _stage(gw)
    # shutdown cancelled the copies: no task is left, the mirror saw its connections closed
    await _poll(lambda: stage.tasks == set(), "the copies cancelled")
    await _poll(lambda: mirror.closed_while_held == 2, "the mirror's connections closed")


async def test_a_resetting_mirror_is_counted_as_failed(tmp_path: Path, main: Recorder) -> None:
    async with (
        recording("reset") as mirror,
        running_gateway(tmp_path, _config(main, mirror)) as gw,
    ):
        for i in range(3):
            response = await _post(gw, b"x" * 10)
            assert response.status == 200, i
            assert response.body == b"main"
        await _until_counted(gw, "failed", 3)
        assert await _counted(gw, "mirrored") == 0
        assert len(main.bodies) == 3


async def test_a_slow_mirror_times_out_within_the_route_timeout(
    tmp_path: Path, main: Recorder
) -> None:
    async with recording("hang") as mirror:
        config = _config(main, mirror).replace("timeout: 30s", "timeout: 300ms")
        async with running_gateway(tmp_path, config) as gw:
            assert (await _post(gw, b"slow")).status == 200
            await _until_counted(gw, "failed", 1)
            assert _stage(gw).tasks == set()


async def test_bodies_above_max_body_bytes_reach_only_the_main_upstream(
    tmp_path: Path, main: Recorder
) -> None:
    big = bytes(range(256)) * 40  # 10240 bytes
    async with (
        recording() as mirror,
        running_gateway(tmp_path, _config(main, mirror, max_body_bytes="4KiB")) as gw,
    ):
        # at the limit: copied whole
        assert (await _post(gw, big[:4096])).status == 200
        await _until_counted(gw, "mirrored", 1)
        assert mirror.bodies == [big[:4096]]
        # a Content-Length above it: skipped up front
        assert (await _post(gw, big)).status == 200
        await _until_counted(gw, "skipped", 1)
        # a chunked body that grows past it: the copy is abandoned as it goes
        response = await _post_chunked(gw, [big[:3000], big[3000:6000], big[6000:]])
        assert response.status == 200
        await _until_counted(gw, "skipped", 2)
        # a chunked body below it: copied, with its length
        assert (await _post_chunked(gw, [b"ab", b"cd"])).status == 200
        await _until_counted(gw, "mirrored", 2)
        # the main upstream got every body whole
        assert main.bodies == [big[:4096], big, big, b"abcd"]
        assert mirror.bodies == [big[:4096], b"abcd"]
        assert mirror.heads[1]["content-length"] == "4"
        assert "transfer-encoding" not in mirror.heads[1]


async def test_copies_beyond_max_in_flight_are_dropped(tmp_path: Path, main: Recorder) -> None:
    async with (
        recording("hang") as mirror,
        running_gateway(tmp_path, _config(main, mirror, max_in_flight=2)) as gw,
    ):
        for _ in range(5):
            assert (await _post(gw, b"q")).status == 200
        await _poll(lambda: len(mirror.bodies) == 2, "two copies at the mirror")
        assert await _counted(gw, "dropped") == 3
        assert len(_stage(gw).tasks) == 2
        assert len(main.bodies) == 5


async def test_sample_ratio_zero_never_mirrors(tmp_path: Path, main: Recorder) -> None:
    async with (
        recording() as mirror,
        running_gateway(tmp_path, _config(main, mirror, sample_ratio=0)) as gw,
    ):
        for _ in range(20):
            assert (await _post(gw, b"z")).status == 200
        assert await _counted(gw, "skipped") == 20
        assert await _counted(gw, "mirrored") == 0
        assert _stage(gw).tasks == set()
        assert mirror.heads == []
        assert len(main.bodies) == 20


async def test_a_reload_replacing_the_stage_cancels_its_copies(
    tmp_path: Path, main: Recorder
) -> None:
    async with (
        recording("hang") as mirror,
        running_gateway(tmp_path, _config(main, mirror)) as gw,
    ):
        assert (await _post(gw, b"before")).status == 200
        await _poll(lambda: len(mirror.bodies) == 1, "the copy at the mirror")
        old = _stage(gw)
        assert len(old.tasks) == 1
        write_config(tmp_path, _config(main, mirror, max_in_flight=5))
        assert (await gw.reload())["ok"] is True
        assert _stage(gw) is not old
        await _poll(lambda: old.tasks == set(), "the old stage's copies cancelled")
        await _poll(lambda: mirror.closed_while_held == 1, "the mirror's connection closed")
        # every copy started ends counted once: this one as cancelled
        assert await _counted(gw, "cancelled") == 1
        assert await _counted(gw, "mirrored") + await _counted(gw, "failed") == 0
        # the new stage mirrors
        assert (await _post(gw, b"after")).status == 200
        await _poll(lambda: len(mirror.bodies) == 2, "the new stage's copy")
        assert mirror.bodies == [b"before", b"after"]


async def test_an_unknown_upstream_is_refused_at_load_with_its_path(
    tmp_path: Path, main: Recorder
) -> None:
    async with (
        recording() as mirror,
        running_gateway(tmp_path, _config(main, mirror)) as gw,
    ):
        config = _config(main, mirror).replace("upstream: shadow", "upstream: shadw")
        write_config(tmp_path, config)
        result = await gw.reload()
        assert result["ok"] is False
        assert "routes[0].pipeline[0].mirror.upstream: unknown upstream 'shadw'" in str(
            result["error"]
        )
