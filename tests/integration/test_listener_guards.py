"""The admin and status listeners guard their connections like the data plane (SPEC §2
`limits`, §8): a request head must arrive within `header_timeout` (else 408 and close), an idle
keep-alive connection is closed after `idle_timeout`, a reload's new limits apply to the next
deadline, and a listener holds at most `MAX_CONNECTIONS` — over it a connection is closed at
once and counted.  Real sockets on both listeners; the slow clients are raw connections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from gateway.web_listener import MAX_CONNECTIONS, WebListener
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import running_gateway, write_config
from tests.support.process import async_wait_until
from tests.support.raw import open_raw, read_response

LISTENERS = ["admin", "status"]
#: a bound on reads that must end much sooner (a hung listener fails the test, not the run)
READ_BOUND = 10.0


def _config(header_timeout: str, idle_timeout: str) -> str:
    return gateway_yaml(
        admin={"bind": "127.0.0.1:0"},
        status={"bind": "127.0.0.1:0"},
        limits={"header_timeout": header_timeout, "idle_timeout": idle_timeout},
        upstreams={"app": upstream_to("http://127.0.0.1:9")},
        routes=[route("app", "app")],
    )


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with running_gateway(tmp_path, _config("400ms", "1500ms")) as gateway:
        yield gateway


def _port(gateway: Gateway, listener: str) -> int:
    web_listener = gateway.admin if listener == "admin" else gateway.status
    assert web_listener is not None
    return web_listener.port


async def _healthz(port: int) -> int:
    reader, writer = await open_raw(port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        return (await asyncio.wait_for(read_response(reader), READ_BOUND)).status
    finally:
        await _close(writer)


async def _until_closed(reader: asyncio.StreamReader) -> tuple[bytes, float]:
    """Everything the listener sends until it closes, and how long that took."""
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), READ_BOUND)
    return data, time.monotonic() - started


@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_head_that_does_not_end_in_time_is_a_408_and_the_listener_serves_on(
    guarded: Gateway, listener: str
) -> None:
    port = _port(guarded, listener)
    reader, writer = await open_raw(port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")  # the head's end never comes
    # meanwhile the listener answers everyone else at once
    assert await _healthz(port) == 200
    data, took = await _until_closed(reader)
    await _close(writer)
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert 0.3 <= took < 3.0


@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_connection_that_sends_nothing_is_closed_without_an_answer(
    guarded: Gateway, listener: str
) -> None:
    reader, writer = await open_raw(_port(guarded, listener))
    data, took = await _until_closed(reader)
    await _close(writer)
    assert data == b""
    assert 0.3 <= took < 3.0


@pytest.mark.parametrize("listener", LISTENERS)
async def test_keep_alive_waits_idle_timeout_not_header_timeout_between_requests(
    guarded: Gateway, listener: str
) -> None:
    reader, writer = await open_raw(_port(guarded, listener))
    request = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    writer.write(request)
    assert (await asyncio.wait_for(read_response(reader), READ_BOUND)).status == 200
    # the client idles past header_timeout (400 ms) but within idle_timeout (1.5 s)
    await asyncio.sleep(0.8)
    writer.write(request)
    assert (await asyncio.wait_for(read_response(reader), READ_BOUND)).status == 200
    data, took = await _until_closed(reader)
    await _close(writer)
    assert data == b""
    assert 1.2 <= took < 4.0


async def test_a_reload_applies_its_header_timeout_to_the_next_connection(
    tmp_path: Path,
) -> None:
    async with running_gateway(tmp_path, _config("5s", "60s")) as gateway:
        port = _port(gateway, "status")
        write_config(tmp_path, _config("300ms", "60s"))
        assert (await gateway.reload())["ok"] is True
        reader, writer = await open_raw(port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        data, took = await _until_closed(reader)
        await _close(writer)
        assert data.startswith(b"HTTP/1.1 408 ")
        assert took < 3.0


async def test_over_max_connections_a_connection_is_closed_at_once_and_counted(
    tmp_path: Path,
) -> None:
    async with running_gateway(tmp_path, _config("30s", "60s")) as gateway:
        status = gateway.status
        assert status is not None
        held: list[asyncio.StreamWriter] = []
        try:
            for _ in range(MAX_CONNECTIONS):
                held.append((await open_raw(status.port))[1])
            await async_wait_until(
                lambda: len(status.connections) == MAX_CONNECTIONS, what="connections held"
            )
            assert _refused(gateway, "status") == 0
            reader, writer = await open_raw(status.port)
            data, took = await _until_closed(reader)
            await _close(writer)
            assert (data, took < 3.0) == (b"", True)
            assert (_refused(gateway, "status"), _refused(gateway, "admin")) == (1, 0)
            # the admin listener has its own room, and the status listener serves again once
            # one of the held connections goes
            assert await _healthz(_port(gateway, "admin")) == 200
            await _close(held.pop())
            await async_wait_until(
                lambda: len(status.connections) < MAX_CONNECTIONS, what="a connection released"
            )
            assert await _healthz(status.port) == 200
        finally:
            for held_writer in held:
                await _close(held_writer)


def _refused(gateway: Gateway, listener: str) -> float:
    for family in text_string_to_metric_families(gateway.metrics_text()):
        for sample in family.samples:
            if sample.name == "gateway_connections_refused_total" and sample.labels == {
                "listener": listener,
                "reason": "max_connections",
            }:
                return sample.value
    raise AssertionError(f"no refused count for {listener}")


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def test_a_listener_of_its_own_caps_and_counts_refusals() -> None:
    """WebListener alone, with a cap of 2: the third connection is refused and reported."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", hello)
    refused: list[int] = []
    listener = WebListener(
        "test",
        app,
        "127.0.0.1",
        0,
        logging.getLogger("test.listener"),
        on_refused=lambda: refused.append(1),
        max_connections=2,
    )
    await listener.start()
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(2):
            held.append((await open_raw(listener.port))[1])
        await async_wait_until(lambda: len(listener.connections) == 2, what="connections held")
        reader, writer = await open_raw(listener.port)
        data, _ = await _until_closed(reader)
        await _close(writer)
        assert (data, refused) == (b"", [1])
    finally:
        for held_writer in held:
            await _close(held_writer)
        await listener.stop()
