"""Retries over real sockets: another endpoint, only safe requests, bounded by time and budget."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import Gateway
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.faulty import closed_port, faulty_upstreams
from tests.support.gateway import port_of, running_gateway
from tests.support.raw import close_writer, exchange, open_raw, read_response

#: two tries, a millisecond apart
TWICE = {"attempts": 2, "backoff": {"base": "1ms", "max": "2ms"}}
THRICE = {**TWICE, "attempts": 3}


def _config(
    urls: list[str],
    retry: Mapping[str, Any],
    *,
    timeout: str = "5s",
    access_log: Mapping[str, Any] | None = None,
) -> str:
    return gateway_yaml(
        access_log=access_log,
        upstreams={"app": upstream_to(*urls, timeouts={"connect": "1s", "response_header": "3s"})},
        routes=[route("app", "app", timeout=timeout, pipeline=[{"retry": retry}])],
    )


async def _request(
    port: int, method: str = "GET", body: bytes = b"", headers: str = ""
) -> tuple[int, dict[str, str], bytes]:
    head = f"{method} /x HTTP/1.1\r\nHost: a\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
    response = await exchange(port, head.encode() + body)
    return response.status, {n.lower(): v for n, v in response.headers}, response.body


async def _metrics(gw: Gateway) -> str:
    assert gw.admin is not None
    url = f"http://127.0.0.1:{gw.admin.port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        return await r.text()


async def test_failed_get_lands_on_the_healthy_endpoint(tmp_path: Path) -> None:
    async with faulty_upstreams("bad", "good") as [bad, good]:
        config = _config([bad.url, good.url], TWICE)
        async with running_gateway(tmp_path, config) as gw:
            port = port_of(gw)
            for failure in ("status:503", "reset"):
                bad.mode = failure
                for _ in range(6):
                    status, headers, _ = await _request(port)
                    assert status == 200, failure
                    assert headers["x-endpoint"] == "good"
            # every request ended on `good` once; each that tried `bad` first was retried once
            assert good.total == 12
            assert bad.total >= 6  # the retries' own picks advance round robin too
            metrics = await _metrics(gw)
            # by reason ("status" for the 503s, "reset" for the resets): all of them together
            line = 'gateway_retries_total{route="app",upstream="app",reason='
            retries = sum(float(x.split()[-1]) for x in metrics.splitlines() if x.startswith(line))
            # (a pooled connection `bad` had closed is also re-tried once by the proxy itself)
            assert 6 <= retries <= bad.total


async def test_connect_error_is_retried_on_another_endpoint(tmp_path: Path) -> None:
    async with faulty_upstreams("good") as [good]:
        dead = f"http://127.0.0.1:{closed_port()}"
        config = _config([dead, good.url], TWICE)
        async with running_gateway(tmp_path, config) as gw:
            for _ in range(4):
                status, headers, _ = await _request(port_of(gw))
                assert status == 200
                assert headers["x-endpoint"] == "good"


async def test_post_without_an_accepted_key_is_never_resent(tmp_path: Path) -> None:
    async with faulty_upstreams("bad", "good") as [bad, good]:
        config = _config([bad.url, good.url], THRICE)
        async with running_gateway(tmp_path, config) as gw:
            port = port_of(gw)
            bad.mode = "reset"
            statuses = [
                (await _request(port, "POST", b"pay 10", "Idempotency-Key: k1\r\n"))[0]
                for _ in range(4)
            ]
            # a key alone is not enough: no idempotency stage accepted it
            assert sorted(statuses) == [200, 200, 502, 502]
            assert bad.requests["POST"] == 2
            assert good.requests["POST"] == 2


async def test_retryable_status_returned_when_attempts_run_out(tmp_path: Path) -> None:
    async with faulty_upstreams("a", "b") as ups:
        config = _config([u.url for u in ups], THRICE)
        async with running_gateway(tmp_path, config) as gw:
            for up in ups:
                up.mode = "status:503"
            status, _, body = await _request(port_of(gw))
            assert status == 503
            assert body in (b"a", b"b")  # the last upstream answer, not a gateway error
            assert sum(u.total for u in ups) == 3
            # alternating endpoints: never the same one twice in a row
            assert {u.total for u in ups} == {1, 2}


async def test_per_try_timeout_moves_on_within_the_route_timeout(tmp_path: Path) -> None:
    async with faulty_upstreams("slow", "good") as [slow, good]:
        retry = {"attempts": 2, "per_try_timeout": "200ms", "retry_on": ["timeout", "reset"]}
        config = _config([slow.url, good.url], retry, timeout="2s")
        async with running_gateway(tmp_path, config) as gw:
            port = port_of(gw)
            slow.mode = "hang"
            loop = asyncio.get_running_loop()
            for _ in range(2):
                started = loop.time()
                status, headers, _ = await _request(port)
                assert status == 200
                assert headers["x-endpoint"] == "good"
                assert loop.time() - started < 1.5
            assert slow.total >= 1  # at least one first try hung and was given up on
            assert good.total == 2


async def test_a_per_try_timeout_is_a_504_and_retried_by_default(tmp_path: Path) -> None:
    """As in Envoy: the default retry_on (… 504) makes `per_try_timeout` useful as written."""
    async with faulty_upstreams("slow", "good") as [slow, good]:
        config = _config([slow.url, good.url], {"attempts": 2, "per_try_timeout": "200ms"})
        async with running_gateway(tmp_path, config) as gw:
            slow.mode = "hang"
            results = [(await _request(port_of(gw)))[0] for _ in range(2)]
            assert results == [200, 200]
            assert slow.total >= 1  # a first try hung there and was given up on
            assert good.total == 2


async def test_timeouts_are_not_retried_unless_asked(tmp_path: Path) -> None:
    async with faulty_upstreams("slow", "good") as [slow, good]:
        retry = {
            "attempts": 2,
            "per_try_timeout": "200ms",
            "retry_on": ["connect_error", "reset", 503],
        }
        config = _config([slow.url, good.url], retry)
        async with running_gateway(tmp_path, config) as gw:
            slow.mode = "hang"
            results = [(await _request(port_of(gw)))[0] for _ in range(2)]
            assert sorted(results) == [200, 504]
            assert slow.total == 1


async def test_large_bodies_are_not_replayed(tmp_path: Path) -> None:
    async with faulty_upstreams("bad") as [bad]:
        config = _config([bad.url], TWICE)
        async with running_gateway(tmp_path, config) as gw:
            port = port_of(gw)
            bad.mode = "status:503"
            assert (await _request(port, "PUT", b"s" * 1000))[0] == 503
            assert bad.requests["PUT"] == 2  # a small body is sent again
            assert (await _request(port, "PUT", b"L" * (64 * 1024 + 1)))[0] == 503
            assert bad.requests["PUT"] == 3  # a larger one only once


async def _storm(port: int, clients: int, each: int) -> int:
    async def client() -> int:
        errors = 0
        for _ in range(each):
            status, _, _ = await _request(port)
            errors += status != 503
        return errors

    return sum(await asyncio.gather(*(client() for _ in range(clients))))


async def test_retry_budget_caps_a_retry_storm(tmp_path: Path) -> None:
    clients, each = 40, 5
    async with faulty_upstreams("a") as [up]:
        up.mode = "status:503"
        capped = {"attempts": 3, "backoff": {"base": "5ms", "max": "5ms"}}
        async with running_gateway(tmp_path, _config([up.url], capped)) as gw:
            assert await _storm(port_of(gw), clients, each) == 0
            with_budget = up.total
            metrics = await _metrics(gw)
        assert "gateway_retry_budget_exhausted_total" in metrics
        exhausted = next(
            line
            for line in metrics.splitlines()
            if line.startswith('gateway_retry_budget_exhausted_total{upstream="app"}')
        )
        assert float(exhausted.split()[-1]) > 0
        # the same storm with a budget too large to matter: every request tries 3 times
        up.requests.clear()
        unbounded = {**capped, "budget": {"ratio": 1.0, "min_concurrent": 1000}}
        async with running_gateway(tmp_path, _config([up.url], unbounded)) as gw:
            assert await _storm(port_of(gw), clients, each) == 0
            without_budget = up.total
    requests = clients * each
    assert without_budget == 3 * requests
    # retries in flight are held to max(3, 20 % of requests in flight)
    assert with_budget <= 1.5 * requests, (with_budget, requests)


async def test_retry_outcome_in_the_access_log(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    async with faulty_upstreams("bad", "good") as [bad, good]:
        config = _config([bad.url, good.url], TWICE, access_log={"enabled": True})
        async with running_gateway(tmp_path, config) as gw:
            bad.mode = "status:502"
            for _ in range(2):
                assert (await _request(port_of(gw)))[0] == 200
            gw.snapshot.access_log.flush()
        good_endpoint = f"127.0.0.1:{good.port}"
    out = capfd.readouterr().out
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    retried = [x for x in lines if x.get("stages", {}).get("retry") == "retried:1"]
    assert retried
    for line in retried:
        assert line["attempts"] == 2
        assert line["endpoint"] == good_endpoint
        assert line["status"] == 200


async def test_expect_continue_body_is_buffered_then_replayed(tmp_path: Path) -> None:
    async with faulty_upstreams("bad", "good") as [bad, good]:
        config = _config([bad.url, good.url], TWICE)
        async with running_gateway(tmp_path, config) as gw:
            bad.mode = "status:503"
            for _ in range(2):
                reader, writer = await open_raw(port_of(gw))
                writer.write(
                    b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
                    b"Expect: 100-continue\r\n\r\n"
                )
                interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert interim.startswith(b"HTTP/1.1 100 Continue")
                writer.write(b"data")
                response = await asyncio.wait_for(read_response(reader), 5)
                assert (response.status, response.body) == (200, b"data")
                await close_writer(writer)
            assert good.requests["PUT"] == 2
