"""Idempotency records shared through a real Redis by real `gateway run` processes, each with
two workers: duplicates spread over both gateways run once, a record written by one is replayed
by the other and outlives both, and Redis missing, paused and back is answered per
`on_store_error` without a restart.  Executions are counted by the upstream, by key."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.faulty import FaultyUpstream, faulty_upstreams
from tests.support.gateway_processes import Gateways, Setup
from tests.support.idempotency import code, post
from tests.support.raw import RawResponse
from tests.support.redis_server import RedisServer


@pytest.fixture
async def upstream() -> AsyncIterator[FaultyUpstream]:
    async with faulty_upstreams("pay") as [up]:
        yield up


def _config(gateways: Gateways, name: str, redis_url: str, upstream_url: str) -> Setup:
    return gateways.config(
        name,
        upstream_url,
        [{"idempotency": {"store": "shared"}}],
        {"shared": {"url": redis_url, "prefix": "e2e:", "timeout": "300ms"}},
    )


def _replayed(response: RawResponse) -> bool:
    return response.header("Idempotent-Replayed") == "true"


@pytest.mark.timeout(120)
async def test_duplicates_over_two_gateways_run_once_and_the_record_outlives_them(
    redis: RedisServer, upstream: FaultyUpstream, gateways: Gateways
) -> None:
    a_config = _config(gateways, "a", redis.url, upstream.url)
    b_config = _config(gateways, "b", redis.url, upstream.url)
    a = await gateways.start(a_config)
    b = await gateways.start(b_config)
    upstream.mode = "slow:0.5"  # the first holds the lock while the others arrive
    answers = await asyncio.gather(
        *(post(a if i % 2 else b, "pay-1", headers="X-Test-Id: pay-1\r\n") for i in range(50))
    )
    assert upstream.executions["pay-1"] == 1
    assert upstream.requests["POST"] == 1
    first = [r for r in answers if r.status == 200 and not _replayed(r)]
    assert len(first) == 1
    assert {r.status for r in answers} <= {200, 409}
    for busy in (r for r in answers if r.status == 409):
        assert code(busy) == "idempotency_key_in_use"
    # completed: either gateway replays it, with the first answer's body
    upstream.mode = "ok"
    for port in (a, b):
        again = await post(port, "pay-1", headers="X-Test-Id: pay-1\r\n")
        assert (again.status, _replayed(again), again.body) == (200, True, first[0].body)
    # both gateways restart: nothing was kept in their memory, Redis still has the record
    gateways.stop_all()
    a = await gateways.start(a_config)
    b = await gateways.start(b_config)
    for port in (a, b):
        again = await post(port, "pay-1", headers="X-Test-Id: pay-1\r\n")
        assert (again.status, _replayed(again)) == (200, True)
    assert upstream.executions["pay-1"] == 1


async def _until_answered(port: int, key: str, within: float = 5.0) -> RawResponse:
    """POST `key` until the answer is not 503 store_unavailable (nothing runs meanwhile)."""
    deadline = time.monotonic() + within
    while True:
        answer = await post(port, key, headers=f"X-Test-Id: {key}\r\n")
        if answer.status != 503 or time.monotonic() > deadline:
            return answer
        assert code(answer) == "store_unavailable"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
async def test_redis_missing_paused_and_back_without_a_restart(
    tmp_path: Path, upstream: FaultyUpstream, gateways: Gateways
) -> None:
    """on_store_error: deny (the default): 503 store_unavailable while Redis cannot answer —
    within the store's timeout when it is paused — and full service once it is back."""
    redis = RedisServer(tmp_path / "redis")  # its port is chosen, nothing listens yet
    try:
        port = await gateways.start(_config(gateways, "a", redis.url, upstream.url))
        refused = await post(port, "k1", headers="X-Test-Id: k1\r\n")
        assert (refused.status, code(refused)) == (503, "store_unavailable")
        redis.start()
        # each worker tries Redis again once its back-off (at most a second) has passed
        served = await _until_answered(port, "k1")
        assert served.status == 200
        assert upstream.executions["k1"] == 1
        redis.pause()
        try:
            started = time.monotonic()
            paused = await post(port, "k2", headers="X-Test-Id: k2\r\n")
            elapsed = time.monotonic() - started
        finally:
            redis.resume()
        assert (paused.status, code(paused)) == (503, "store_unavailable")
        assert elapsed < 2.0, elapsed  # the store's timeout is 300 ms
        assert upstream.executions["k2"] == 0
        # the begin Redis ran when it resumed took a lock the gateway gives up in the
        # background: the client's retry runs within moments, not after the lock's ttl
        statuses = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            again = await post(port, "k2", headers="X-Test-Id: k2\r\n")
            statuses.append(again.status)
            if again.status == 200:
                break
            assert (again.status, code(again)) in {
                (409, "idempotency_key_in_use"),  # the late lock, until it is given up
                (503, "store_unavailable"),  # the worker's back-off after the pause
            }
            await asyncio.sleep(0.05)
        assert statuses[-1] == 200, statuses
        assert upstream.executions["k2"] == 1
    finally:
        redis.stop()
