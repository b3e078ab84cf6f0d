"""The active health checker over real sockets on 127.0.0.1: passes, 5xx, hangs, refusals, a
probe that blows up, and stopping.  Every wait is for an event, bounded by asyncio.wait_for."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config.model import HealthCheckConfig
from gateway.upstream.health import HealthChecker

FAST = HealthCheckConfig(path="/healthz", interval=0.05, timeout=0.2, healthy=2, unhealthy=3)
WITHIN = 5.0  # seconds any awaited condition gets before the test fails


class Upstream:
    """An aiohttp upstream whose /healthz answers as `mode` says, counting the probes."""

    def __init__(self) -> None:
        self.mode: Literal["ok", "fail", "hang"] = "ok"
        self.requests = 0
        self.last: tuple[str, str, dict[str, str]] | None = None
        self.port = 0
        self._tick = asyncio.Event()
        #: lets hanging handlers go when the test ends
        self.release = asyncio.Event()

    async def healthz(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.last = (request.method, request.raw_path, dict(request.headers))
        self._tick.set()
        if self.mode == "hang":
            await self.release.wait()
        return web.Response(status=200 if self.mode == "ok" else 503, text=self.mode)

    async def probed(self, count: int) -> None:
        """Return once at least `count` probes have arrived."""

        async def wait() -> None:
            while self.requests < count:
                self._tick.clear()
                await self._tick.wait()

        await asyncio.wait_for(wait(), WITHIN)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    app = web.Application()
    app.router.add_get("/healthz", up.healthz)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    assert server.port is not None
    up.port = server.port
    try:
        yield up
    finally:
        up.release.set()
        await server.close()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (just bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Changes:
    """on_change calls, awaitable one by one; each with the probe count it came after."""

    def __init__(self, probes: Callable[[], int] = lambda: 0) -> None:
        self._probes = probes
        self._queue: asyncio.Queue[tuple[int, bool, int]] = asyncio.Queue()

    def __call__(self, index: int, healthy: bool) -> None:
        self._queue.put_nowait((index, healthy, self._probes()))

    async def next(self) -> tuple[int, bool, int]:
        return await asyncio.wait_for(self._queue.get(), WITHIN)

    def empty(self) -> bool:
        return self._queue.empty()


def _checker(
    targets: list[tuple[str, int]],
    on_change: Callable[[int, bool], None],
    config: HealthCheckConfig = FAST,
) -> HealthChecker:
    return HealthChecker(asyncio.get_running_loop(), config, targets, on_change)


async def test_a_healthy_endpoint_stays_healthy(upstream: Upstream) -> None:
    changes = Changes()
    checker = _checker([("127.0.0.1", upstream.port)], changes)
    assert checker.healthy(0)  # before any check: traffic is not turned away
    checker.start()
    try:
        await upstream.probed(5)
        assert checker.healthy(0)
        assert checker.last_error(0) is None
        assert changes.empty()
    finally:
        checker.close()
    assert upstream.last is not None
    method, path, headers = upstream.last
    assert (method, path) == ("GET", "/healthz")
    assert headers["Host"] == f"127.0.0.1:{upstream.port}"
    assert headers["User-Agent"] == "gateway-health-check"
    assert headers["Connection"] == "close"


async def test_5xx_makes_it_unhealthy_and_2xx_healthy_again(upstream: Upstream) -> None:
    upstream.mode = "fail"
    changes = Changes(lambda: upstream.requests)
    checker = _checker([("127.0.0.1", upstream.port)], changes)
    checker.start()
    try:
        # it starts healthy: exactly `unhealthy` failed probes flip it
        assert await changes.next() == (0, False, FAST.unhealthy)
        assert not checker.healthy(0)
        assert checker.last_error(0) == "status 503"
        upstream.mode = "ok"
        before = upstream.requests
        index, healthy, probes = await changes.next()
        assert (index, healthy) == (0, True)
        # the mode changed between probes or during one: `healthy` passes, maybe one more probe
        assert probes - before in (FAST.healthy, FAST.healthy + 1)
        assert checker.healthy(0)
        assert checker.last_error(0) is None
    finally:
        checker.close()


async def test_a_hang_is_a_timeout(upstream: Upstream) -> None:
    upstream.mode = "hang"
    changes = Changes()
    loop = asyncio.get_running_loop()
    checker = _checker([("127.0.0.1", upstream.port)], changes)
    started = loop.time()
    checker.start()
    try:
        assert (await changes.next())[:2] == (0, False)
        last_error = checker.last_error(0)
        assert last_error is not None
        assert "timeout" in last_error
        # each of the `unhealthy` probes waited out its timeout
        assert loop.time() - started >= FAST.unhealthy * FAST.timeout * 0.9
    finally:
        checker.close()


async def test_a_refused_connection_fails() -> None:
    changes = Changes()
    checker = _checker([("127.0.0.1", closed_port())], changes)
    checker.start()
    try:
        assert (await changes.next())[:2] == (0, False)
        assert not checker.healthy(0)
        assert checker.last_error(0) == "connection refused"
    finally:
        checker.close()


async def test_endpoints_are_judged_independently(upstream: Upstream) -> None:
    changes = Changes()
    checker = _checker([("127.0.0.1", closed_port()), ("127.0.0.1", upstream.port)], changes)
    checker.start()
    try:
        assert (await changes.next())[:2] == (0, False)
        await upstream.probed(FAST.unhealthy + 2)
        assert checker.healthy(1)
        assert changes.empty()
    finally:
        checker.close()


async def test_garbage_fails() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    changes = Changes()
    checker = _checker([("127.0.0.1", port)], changes)
    checker.start()
    try:
        assert (await changes.next())[:2] == (0, False)
        assert checker.last_error(0) == "invalid response"
    finally:
        checker.close()
        server.close()
        await server.wait_closed()


async def test_a_probe_that_raises_does_not_stop_checking(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    attempts = 0
    enough = asyncio.Event()

    async def boom(*args: Any, **kwargs: Any) -> Any:
        nonlocal attempts
        attempts += 1
        if attempts >= FAST.unhealthy + 2:
            enough.set()
        raise RuntimeError("boom")

    # the checker's module looks it up on asyncio at each probe
    monkeypatch.setattr(asyncio, "open_connection", boom)
    changes = Changes()
    checker = _checker([("127.0.0.1", closed_port())], changes)
    with caplog.at_level(logging.ERROR, logger="gateway.health"):
        checker.start()
        try:
            assert (await changes.next())[:2] == (0, False)
            assert checker.last_error(0) == "error: RuntimeError"
            await asyncio.wait_for(enough.wait(), WITHIN)  # still probing after the failures
        finally:
            checker.close()
    assert any(r.name == "gateway.health" and r.exc_info for r in caplog.records)


async def test_a_failing_listener_does_not_stop_checking(upstream: Upstream) -> None:
    upstream.mode = "fail"
    calls: list[tuple[int, bool]] = []

    def on_change(index: int, healthy: bool) -> None:
        calls.append((index, healthy))
        raise RuntimeError("listener bug")

    checker = _checker([("127.0.0.1", upstream.port)], on_change)
    checker.start()
    try:
        await upstream.probed(FAST.unhealthy + 2)
        assert calls == [(0, False)]
    finally:
        checker.close()


async def test_close_stops_probing(upstream: Upstream) -> None:
    checker = _checker([("127.0.0.1", upstream.port)], Changes())
    checker.start()
    await upstream.probed(2)
    # the next probe is an interval away: nothing is left in flight that the upstream has not
    # counted yet
    checker.close()
    count = upstream.requests
    # proving that nothing happens needs time to pass: this sleep is not waiting for a
    # condition, it is the several intervals in which no probe may arrive
    await asyncio.sleep(FAST.interval * 4)
    assert upstream.requests == count
    checker.close()  # idempotent
    checker.start()  # closed is final
    await asyncio.sleep(FAST.interval * 2)  # likewise: proving nothing happens
    assert upstream.requests == count


async def test_close_without_start() -> None:
    checker = _checker([("127.0.0.1", closed_port())], Changes())
    checker.close()
    checker.close()
    assert checker.healthy(0)
    assert checker.last_error(0) is None
