"""Endpoint health over real sockets: active checks and outlier ejection take endpoints out of
rotation and bring them back; with none left, 503 no_healthy_upstream."""

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
from tests.support.faulty import FaultyUpstream, faulty_upstreams
from tests.support.gateway import port_of, running_gateway
from tests.support.process import async_wait_until
from tests.support.raw import close_writer, exchange, open_raw

#: two failures in a row eject an endpoint for 10 s, but never both of two
EJECT_AFTER_TWO = {
    "outlier_detection": {"consecutive_failures": 2, "ejection": "10s", "max_ejected_percent": 50}
}


def _config(
    urls: list[str], health: Mapping[str, Any], access_log: Mapping[str, Any] | None = None
) -> str:
    """An upstream over `urls` with `health` (its health_check or outlier_detection)."""
    timeouts = {"connect": "1s", "response_header": "2s"}
    return gateway_yaml(
        access_log=access_log,
        upstreams={"app": upstream_to(*urls, timeouts=timeouts, **health)},
        routes=[route("app", "app")],
    )


async def _get(port: int) -> tuple[int, dict[str, str], bytes]:
    response = await exchange(port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    return response.status, {n.lower(): v for n, v in response.headers}, response.body


async def _admin_get(gw: Gateway, path: str) -> str:
    assert gw.admin is not None
    url = f"http://127.0.0.1:{gw.admin.port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        return await r.text()


def _endpoint_up(metrics: str, port: int) -> float:
    prefix = f'gateway_upstream_endpoint_up{{upstream="app",endpoint="127.0.0.1:{port}"}}'
    return float(next(x for x in metrics.splitlines() if x.startswith(prefix)).split()[-1])


async def test_health_checks_take_an_endpoint_out_and_bring_it_back(tmp_path: Path) -> None:
    health = {
        "health_check": {
            "path": "/healthz",
            "interval": "50ms",
            "timeout": "40ms",
            "healthy": 2,
            "unhealthy": 2,
        }
    }
    async with (
        faulty_upstreams("a", "b") as [a, b],
        running_gateway(tmp_path, _config([a.url, b.url], health)) as gw,
    ):
        port = port_of(gw)
        upstream = gw.snapshot.upstreams["app"]
        await async_wait_until(lambda: a.health_checks >= 2, within=5, what="checks")
        a.health = "fail"
        await async_wait_until(
            lambda: not upstream.endpoints[0].healthy, within=5, what="a unhealthy"
        )
        a.requests.clear()
        for _ in range(6):
            status, headers, _ = await _get(port)
            assert (status, headers["x-endpoint"]) == (200, "b")
        assert a.total == 0
        metrics = await _admin_get(gw, "/metrics")
        assert _endpoint_up(metrics, a.port) == 0
        assert _endpoint_up(metrics, b.port) == 1
        described = json.loads(await _admin_get(gw, "/admin/upstreams"))[0]["endpoints"][0]
        assert described["up"] is False
        assert described["health"] == {"healthy": False, "last_error": "status 503"}

        a.health = "ok"
        await async_wait_until(
            lambda: upstream.endpoints[0].healthy, within=5, what="a healthy again"
        )
        seen = {(await _get(port))[1]["x-endpoint"] for _ in range(4)}
        assert seen == {"a", "b"}
        assert _endpoint_up(await _admin_get(gw, "/metrics"), a.port) == 1


async def test_no_healthy_endpoint_is_a_503(tmp_path: Path) -> None:
    health = {"health_check": {"interval": "50ms", "timeout": "40ms", "unhealthy": 1}}
    async with (
        faulty_upstreams("a") as [a],
        running_gateway(tmp_path, _config([a.url], health)) as gw,
    ):
        upstream = gw.snapshot.upstreams["app"]
        a.health = "hang"  # a check that times out fails too
        await async_wait_until(
            lambda: not upstream.endpoints[0].healthy, within=5, what="a unhealthy"
        )
        status, _, body = await _get(port_of(gw))
        assert status == 503
        assert json.loads(body)["code"] == "no_healthy_upstream"
        assert a.total == 0


async def test_outlier_detection_ejects_then_readmits(tmp_path: Path) -> None:
    outliers = {
        "outlier_detection": {
            "consecutive_failures": 3,
            "ejection": "300ms",
            "max_ejection": "10s",
            "max_ejected_percent": 50,
        }
    }
    async with (
        faulty_upstreams("a", "b") as [a, b],
        running_gateway(tmp_path, _config([a.url, b.url], outliers)) as gw,
    ):
        port = port_of(gw)
        upstream = gw.snapshot.upstreams["app"]
        a.mode = "status:503"
        answers = [(await _get(port))[0] for _ in range(6)]
        # round robin: three 503s from `a` (the third ejects it), three 200s from `b`
        assert sorted(answers) == [200, 200, 200, 503, 503, 503]
        assert upstream.endpoints[0].ejected
        for _ in range(4):
            assert (await _get(port))[1]["x-endpoint"] == "b"
        assert a.total == 3
        described = json.loads(await _admin_get(gw, "/admin/upstreams"))[0]["endpoints"][0]
        assert described["outlier"]["ejected"] is True
        assert described["outlier"]["ejections"] == 1

        a.mode = "ok"
        await async_wait_until(
            lambda: not upstream.endpoints[0].ejected, within=5, what="readmission"
        )
        seen = {(await _get(port))[1]["x-endpoint"] for _ in range(4)}
        assert seen == {"a", "b"}


async def test_ejection_never_exceeds_max_ejected_percent(tmp_path: Path) -> None:
    async with (
        faulty_upstreams("a", "b") as ups,
        running_gateway(tmp_path, _config([u.url for u in ups], EJECT_AFTER_TWO)) as gw,
    ):
        for up in ups:
            up.mode = "status:502"
        for _ in range(8):
            assert (await _get(port_of(gw)))[0] == 502
        ejected = [e.ejected for e in gw.snapshot.upstreams["app"].endpoints]
        assert ejected.count(True) == 1


async def test_an_endpoint_that_cuts_bodies_is_ejected(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Issue 12: outlier detection judged exchanges by their head, so an endpoint cutting every
    body was never ejected (and the access log and metrics said nothing of the cut)."""
    async with faulty_upstreams("a", "b") as [a, b]:
        config = _config([a.url, b.url], EJECT_AFTER_TWO, access_log={"enabled": True})
        async with running_gateway(tmp_path, config) as gw:
            await _cut_bodies_are_failures(gw, a)
            gw.snapshot.access_log.flush()
        cutting = f"127.0.0.1:{a.port}"
    lines = [json.loads(x) for x in capfd.readouterr().out.splitlines() if x.startswith("{")]
    cut = [x for x in lines if x.get("endpoint") == cutting]
    assert [x.get("stages", {}).get("upstream") for x in cut] == ["body_cut", "body_cut"]


async def _cut_bodies_are_failures(gw: Gateway, a: FaultyUpstream) -> None:
    port = port_of(gw)
    a.mode = "cut:1000"
    for _ in range(4):  # round robin: two go to `a`, each cut short
        reader, writer = await open_raw(port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        await asyncio.wait_for(reader.read(), 5)  # to the end, cut short or not
        await close_writer(writer)
    upstream = gw.snapshot.upstreams["app"]
    assert upstream.endpoints[0].ejected
    attempts = gw.metrics.upstream_attempts_total
    assert attempts.labels("app", f"127.0.0.1:{a.port}", "failure").value == 2
    for _ in range(4):
        assert (await _get(port))[1]["x-endpoint"] == "b"
    assert a.total == 2
