"""What an operator sees of a redis store: `/admin/stores` (state, last error, the url without
its password), `/readyz` (stores listed, the gateway still ready when one is down), the
`gateway_store_*` metrics, and one log line per outage — with a real redis-server stopped and
started again."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.app import Gateway
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.faulty import faulty_upstreams
from tests.support.gateway import port_of, running_gateway
from tests.support.idempotency import code, post
from tests.support.redis_server import RedisServer


async def _admin(gw: Gateway, path: str) -> tuple[int, bytes]:
    assert gw.admin is not None
    url = f"http://127.0.0.1:{gw.admin.port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.read()


def _metric(text: bytes, name: str, labels: str) -> float:
    found = re.search(rb"^" + re.escape(f"{name}{{{labels}}}".encode()) + rb" (\S+)$", text, re.M)
    assert found is not None, (name, labels)
    return float(found.group(1))


async def test_the_store_as_the_admin_api_readyz_metrics_and_logs_show_it(
    tmp_path: Path, redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://:hunter2@127.0.0.1:{redis.port}/0"
    redis.command("CONFIG", "SET", "requirepass", "hunter2")
    async with (
        faulty_upstreams("pay") as [up],
        running_gateway(
            tmp_path,
            gateway_yaml(
                upstreams={"app": upstream_to(up.url)},
                routes=[route("pay", "app", pipeline=[{"idempotency": {"store": "shared"}}])],
                stores={"shared": {"url": url, "timeout": "300ms"}},
            ),
        ) as gw,
    ):
        assert (await post(port_of(gw), "k1")).status == 200
        status, body = await _admin(gw, "/admin/stores")
        assert status == 200
        [shown] = json.loads(body)
        assert shown["name"] == "shared"
        assert shown["state"] == "up"
        assert shown["url"] == f"redis://***@127.0.0.1:{redis.port}/0"
        status, body = await _admin(gw, "/readyz")
        assert (status, json.loads(body)) == (200, {"state": "ready", "stores": {"shared": "up"}})
        status, body = await _admin(gw, "/admin/config")
        assert status == 200
        assert b"hunter2" not in body
        _, metrics = await _admin(gw, "/metrics")
        assert _metric(metrics, "gateway_store_up", 'store="shared"') == 1
        ok = _metric(metrics, "gateway_store_operations_total", 'store="shared",outcome="ok"')
        assert ok >= 2  # warming's PING and the request's begin and complete

        redis.stop()
        with caplog.at_level(logging.WARNING, logger="gateway.stores"):
            for key in ("k2", "k3", "k4"):
                refused = await post(port_of(gw), key)
                assert (refused.status, code(refused)) == (503, "store_unavailable")
        outages = [r for r in caplog.records if r.name == "gateway.stores"]
        assert len(outages) == 1  # once per outage, not once per request
        assert "hunter2" not in outages[0].getMessage()
        _, body = await _admin(gw, "/admin/stores")
        [shown] = json.loads(body)
        assert shown["state"] == "down"
        assert "ConnectionError" in shown["last_error"]
        assert "hunter2" not in body.decode()
        status, body = await _admin(gw, "/readyz")
        assert (status, json.loads(body)["stores"]) == (200, {"shared": "down"})
        _, metrics = await _admin(gw, "/metrics")
        assert _metric(metrics, "gateway_store_up", 'store="shared"') == 0
        errors = _metric(
            metrics, "gateway_store_operations_total", 'store="shared",outcome="error"'
        )
        skipped = _metric(
            metrics, "gateway_store_operations_total", 'store="shared",outcome="backoff"'
        )
        # every failed operation is counted (the three begins, the loop giving up the locks
        # they may have left), but only the first of a back-off tried Redis
        assert errors >= 1
        assert errors + skipped >= 3
        assert errors <= 3

        redis.start()
        redis.command("CONFIG", "SET", "requirepass", "hunter2")
        with caplog.at_level(logging.INFO, logger="gateway.stores"):
            deadline = time.monotonic() + 5
            while (answer := await post(port_of(gw), "k5")).status == 503:
                assert time.monotonic() < deadline  # the back-off is at most a second
                await asyncio.sleep(0.05)
            assert answer.status == 200
        assert any("answers again" in r.getMessage() for r in caplog.records)
        _, metrics = await _admin(gw, "/metrics")
        assert _metric(metrics, "gateway_store_up", 'store="shared"') == 1
