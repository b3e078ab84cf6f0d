"""The circuit breaker over real sockets: it opens, sheds load, probes and closes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from gateway.app import Gateway
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.faulty import FaultyUpstream, faulty_upstreams
from tests.support.gateway import port_of, running_gateway, write_config
from tests.support.process import async_wait_until
from tests.support.raw import close_writer, exchange, open_raw

#: long enough for the admin and metrics calls made while the circuit is open, on a busy machine
OPEN_FOR = 1.0


def _config(url: str, breaker: Mapping[str, Any], **sections: Any) -> str:
    return gateway_yaml(
        upstreams={"app": upstream_to(url, timeouts={"response_header": "1s"})},
        routes=[route("app", "app", pipeline=[{"circuit_breaker": breaker}])],
        **sections,
    )


@asynccontextmanager
async def _guarded(
    tmp_path: Path, breaker: Mapping[str, Any]
) -> AsyncIterator[tuple[FaultyUpstream, Gateway]]:
    """Upstream `a` behind `breaker`."""
    async with (
        faulty_upstreams("a") as [up],
        running_gateway(tmp_path, _config(up.url, breaker)) as gw,
    ):
        yield up, gw


async def _get(port: int, path: str = "/x") -> tuple[int, dict[str, str], bytes]:
    response = await exchange(port, f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    return response.status, {n.lower(): v for n, v in response.headers}, response.body


def _admin(gw: Gateway) -> str:
    assert gw.admin is not None
    return f"http://127.0.0.1:{gw.admin.port}"


async def _circuit(gw: Gateway) -> dict[str, object]:
    url = f"{_admin(gw)}/admin/upstreams"
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        upstreams = await r.json()
    [breaker] = upstreams[0]["circuit_breakers"]
    assert isinstance(breaker, dict)
    return breaker


async def _metrics(gw: Gateway) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{_admin(gw)}/metrics") as r:
        return await r.text()


async def test_opens_sheds_probes_and_closes(tmp_path: Path) -> None:
    breaker = {
        "min_requests": 4,
        "failure_ratio": 0.5,
        "window": "10s",
        "open_for": f"{int(OPEN_FOR * 1000)}ms",
        "half_open_requests": 2,
    }
    async with _guarded(tmp_path, breaker) as (up, gw):
        port = port_of(gw)
        # times on the loop clock the breaker reads (the gateway runs on this loop); it only
        # moves forward, so a time read here before a request is no later than any the gateway
        # reads while handling it
        loop = asyncio.get_running_loop()
        up.mode = "status:503"
        for i in range(4):
            if i == 3:
                # the breaker opens as it records this request's outcome: not before now
                opened = loop.time()
            status, _, _ = await _get(port)
            assert status == 503  # the upstream's own 503, passed through
        assert up.total == 4

        # open: shed at the gateway, never reaching the upstream
        status, headers, body = await _get(port)
        assert status == 503
        assert json.loads(body)["code"] == "circuit_open"
        assert int(headers["retry-after"]) >= 1
        assert up.total == 4
        assert (await _circuit(gw))["state"] == "open"
        metrics = await _metrics(gw)
        assert 'gateway_circuit_breaker_state{route="app",upstream="app"} 1' in metrics
        assert (
            'gateway_circuit_breaker_transitions_total{route="app",upstream="app",to="open"} 1'
            in metrics
        )

        # half-open once open_for (± 10 % jitter) has passed since it opened, not sooner
        up.mode = "ok"
        await async_wait_until(
            lambda: _state(gw) == "half_open", within=OPEN_FOR * 1.1 + 5, what="half-open"
        )
        half_opened = loop.time() - opened
        assert OPEN_FOR * 0.9 - 1e-9 <= half_opened < OPEN_FOR * 1.1 + 2.0, half_opened
        # the next requests are probes
        status, _, _ = await _get(port)
        assert status == 200
        assert up.total == 5
        assert (await _circuit(gw))["state"] == "half_open"
        status, _, _ = await _get(port)
        assert status == 200
        assert (await _circuit(gw))["state"] == "closed"
        metrics = await _metrics(gw)
        assert 'gateway_circuit_breaker_state{route="app",upstream="app"} 0' in metrics
        for state in ("open", "half_open", "closed"):
            assert f'upstream="app",to="{state}"}} 1' in metrics


async def test_failed_probe_reopens_for_longer(tmp_path: Path) -> None:
    breaker = {
        "min_requests": 2,
        "open_for": "200ms",
        "max_open_for": "10s",
        "half_open_requests": 1,
    }
    async with _guarded(tmp_path, breaker) as (up, gw):
        port = port_of(gw)
        up.mode = "reset"
        for _ in range(2):
            assert (await _get(port))[0] == 502
        first = await _circuit(gw)
        assert first["state"] == "open"
        before = up.total
        while (await _get(port))[0] == 503:  # until the probe goes through (and fails)
            pass
        assert up.total == before + 1
        second = await _circuit(gw)
        assert second["state"] == "open"
        assert second["consecutive_trips"] == 2
        # the second open period is about twice the first (0.2 s doubled, ± 10 %)
        assert isinstance(second["open_remaining"], float)
        assert 0.3 < second["open_remaining"] <= 0.45


async def test_fallback_response_while_open(tmp_path: Path) -> None:
    fallback = {
        "status": 200,
        "body": "cached answer",
        "headers": {"Content-Type": "text/plain", "X-Fallback": "yes"},
    }
    breaker = {"min_requests": 2, "open_for": "10s", "fallback": fallback}
    async with _guarded(tmp_path, breaker) as (up, gw):
        port = port_of(gw)
        up.mode = "hang"
        # a hang is a timeout (504): a failure
        for _ in range(2):
            assert (await _get(port))[0] == 504
        status, headers, body = await _get(port)
        assert (status, body) == (200, b"cached answer")
        assert headers["x-fallback"] == "yes"
        assert headers["content-type"] == "text/plain"
        assert int(headers["retry-after"]) >= 9
        assert up.total == 2


async def test_statuses_not_listed_are_successes(tmp_path: Path) -> None:
    breaker = {"min_requests": 2, "failure_statuses": [500]}
    async with _guarded(tmp_path, breaker) as (up, gw):
        port = port_of(gw)
        up.mode = "status:503"
        for _ in range(2):
            assert (await _get(port))[0] == 503
        assert (await _circuit(gw))["state"] == "closed"
        up.mode = "status:500"
        assert (await _get(port))[0] == 500
        assert (await _circuit(gw))["state"] == "closed"  # 1 failure in 3
        assert (await _get(port))[0] == 500
        assert (await _circuit(gw))["state"] == "open"  # 2 in 4 reaches 0.5
        assert up.total == 4


async def test_an_open_circuit_survives_an_unrelated_reload(tmp_path: Path) -> None:
    breaker = {"min_requests": 2, "open_for": "1m"}
    async with faulty_upstreams("a") as [up]:
        text = _config(up.url, breaker)
        async with running_gateway(tmp_path, text) as gw:
            port = port_of(gw)
            up.mode = "status:502"
            for _ in range(2):
                assert (await _get(port))[0] == 502
            write_config(tmp_path, _config(up.url, breaker, limits={"idle_timeout": "30s"}))
            result = await gw.reload()
            assert result["ok"], result
            assert result["changed"]
            status, _, body = await _get(port)
            assert (status, json.loads(body)["code"]) == (503, "circuit_open")
            write_config(tmp_path, _config(up.url, {"min_requests": 3, "open_for": "1m"}))
            assert (await gw.reload())["ok"]
            up.mode = "ok"
            assert (await _get(port))[0] == 200  # a changed breaker starts closed
            assert up.total == 3


async def test_a_body_cut_short_is_a_failure(tmp_path: Path) -> None:
    """Issue 12: an endpoint cutting every body after 1,000 bytes failed every request while
    the breaker stayed closed — it judged each exchange by its head."""
    breaker = {
        "min_requests": 3,
        "failure_ratio": 0.5,
        "window": "10s",
        "open_for": f"{OPEN_FOR}s",
    }
    async with faulty_upstreams("cutting") as [up]:
        up.mode = "cut:1000"
        async with running_gateway(tmp_path, _config(up.url, breaker)) as gw:
            port = port_of(gw)
            for _ in range(3):
                reader, writer = await open_raw(port)
                writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200")  # the head was fine
                body = await asyncio.wait_for(reader.read(), 5)
                assert len(body) < 100_000  # the body was not
                await close_writer(writer)
            status, _, body = await _get(port)
            assert status == 503
            assert json.loads(body)["code"] == "circuit_open"
            assert up.total == 3


#: concurrent requests sent once the circuit is half-open, and the probes it may admit
CONCURRENT = 10
PROBES = 3


async def test_half_open_admits_exactly_its_probes_under_concurrency(tmp_path: Path) -> None:
    """Ten requests at once on a half-open circuit with half_open_requests: 3: three reach the
    upstream (held there until every request has been decided), seven get 503 circuit_open;
    the three succeeding close the circuit."""
    breaker = {"min_requests": 2, "open_for": "200ms", "half_open_requests": PROBES}
    async with _guarded(tmp_path, breaker) as (up, gw):
        port = port_of(gw)
        up.mode = "status:503"
        for _ in range(2):
            assert (await _get(port))[0] == 503
        assert _state(gw) == "open"
        up.mode = "ok"
        gate = up.held["probe"] = asyncio.Event()
        await async_wait_until(lambda: _state(gw) == "half_open", within=5, what="half-open")
        request = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Test-Id: probe\r\n\r\n"
        tasks = [asyncio.ensure_future(exchange(port, request)) for _ in range(CONCURRENT)]
        try:
            # every request decided: the probes at the upstream, the rest answered
            await async_wait_until(
                lambda: up.executions["probe"] + sum(t.done() for t in tasks) == CONCURRENT,
                within=10,
                what="every request admitted or refused",
            )
            refused = [t.result() for t in tasks if t.done()]
            assert up.executions["probe"] == PROBES
            assert len(refused) == CONCURRENT - PROBES
            for response in refused:
                assert response.status == 503
                assert json.loads(response.body)["code"] == "circuit_open"
        finally:
            gate.set()
        answers = await asyncio.gather(*tasks)
        assert sorted(r.status for r in answers) == [200] * PROBES + [503] * (CONCURRENT - PROBES)
        assert up.executions["probe"] == PROBES
        assert _state(gw) == "closed"


def _state(gw: Gateway) -> str:
    """The breaker's state as /admin/upstreams describes it (the same call, in-process)."""
    [upstream] = gw.upstreams_info()
    [circuit] = upstream["circuit_breakers"]
    state = circuit["state"]
    assert isinstance(state, str)
    return state
