"""A rate limit shared through a real Redis by real `gateway run` processes with two workers
each: one hot key over two gateways admits within [0.95 x limit, limit], counted by the
upstream (what is leased and unspent is never admitted); the round trips Redis saw per 1,000
admitted are reported from its own `INFO commandstats`; and Redis stopped under load is answered
per `on_store_error` — a local bucket with `allow`, 503 with `deny` — and counted."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import pytest

from tests.support.faulty import FaultyUpstream, faulty_upstreams
from tests.support.gateway_processes import Gateways
from tests.support.process import http_get
from tests.support.raw import RawResponse, exchange
from tests.support.redis_server import RedisServer

REQUEST = b"GET /item HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


@pytest.fixture
async def upstream() -> AsyncIterator[FaultyUpstream]:
    async with faulty_upstreams("app") as [up]:
        yield up


def _stores(redis: RedisServer) -> dict[str, object]:
    return {"shared": {"url": redis.url, "timeout": "300ms"}}


def _round_trips(redis: RedisServer) -> int:
    line = re.search(r"cmdstat_evalsha:(\S+)", redis.command("INFO", "commandstats"))
    if line is None:
        return 0
    fields = dict(item.split("=") for item in line.group(1).split(","))
    return int(fields["calls"]) - int(fields.get("failed_calls", 0))


async def _wave(ports: list[int], count: int) -> list[RawResponse]:
    """`count` requests at once, each on a connection of its own (so both workers of each
    gateway get some), spread over `ports`."""
    return await asyncio.gather(
        *(exchange(ports[i % len(ports)], REQUEST, within=10) for i in range(count))
    )


@pytest.mark.timeout(120)
async def test_one_hot_key_over_two_gateways_admits_within_the_bound(
    redis: RedisServer, upstream: FaultyUpstream, gateways: Gateways
) -> None:
    """100 tokens an hour (the refill during the test is far under one token), key `route`:
    every request of both gateways' four workers spends the same bucket."""
    stage = {"rate_limit": {"rate": 100, "per": "1h", "key": "route", "store": "shared"}}
    ports = [
        await gateways.start(gateways.config(name, upstream.url, [stage], _stores(redis)))
        for name in ("a", "b")
    ]
    answers: list[RawResponse] = []
    for _ in range(6):
        answers += await _wave(ports, 100)
    admitted = sum(1 for r in answers if r.status == 200)
    limited = [r for r in answers if r.status == 429]
    assert admitted + len(limited) == len(answers)
    assert upstream.requests["GET"] == admitted
    assert 95 <= admitted <= 100, admitted
    for refused in limited:
        assert refused.header("Retry-After") is not None
        assert (
            refused.header("RateLimit")
            == '"app";r=0;t=' + refused.header("RateLimit").split("t=")[1]
        )
    trips = _round_trips(redis)
    print(f"redis round trips: {trips} for {admitted} admitted of {len(answers)}")
    # a refused request is answered by the worker itself once Redis said the bucket is empty
    assert trips < len(answers)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("on_store_error", ["allow", "deny"])
async def test_redis_stopped_under_load_then_back(
    redis: RedisServer, upstream: FaultyUpstream, gateways: Gateways, on_store_error: str
) -> None:
    """A burst of 8 (leases of at most 2 tokens): once the leases in hand are spent, `allow`
    admits from a local bucket and `deny` answers 503, each counted; when Redis is back, the
    shared bucket is used again without a restart."""
    stage = {
        "rate_limit": {
            "rate": 1000,
            "burst": 8,
            "key": "route",
            "store": "shared",
            "on_store_error": on_store_error,
        }
    }
    setup = gateways.config("a", upstream.url, [stage], _stores(redis))
    port = await gateways.start(setup)
    before = await _wave([port], 20)
    assert {r.status for r in before} <= {200, 429}
    redis.stop()
    during = []
    for _ in range(4):
        during += await _wave([port], 20)
        await asyncio.sleep(0.02)  # the local buckets refill (1000 a second)
    statuses = {r.status for r in during}
    if on_store_error == "allow":
        assert statuses <= {200, 429}
        assert sum(r.status == 200 for r in during) >= 20
    else:
        assert 503 in statuses
        assert statuses <= {200, 429, 503}
        for failed in (r for r in during if r.status == 503):
            assert b"store_unavailable" in failed.body
    status, metrics = http_get(f"http://127.0.0.1:{setup.admin}/metrics")
    assert status == 200
    errors = re.findall(
        rb'gateway_rate_limit_store_errors_total\{route="app"\} (\d+(?:\.\d+)?)', metrics
    )
    assert errors
    assert float(errors[0]) > 0
    redis.start()  # same port, an empty Redis: a full bucket
    # each worker tries Redis again once its back-off (at most a second) has passed
    deadline = time.monotonic() + 5
    while _round_trips(redis) == 0 and time.monotonic() < deadline:
        after = await _wave([port], 20)
        assert {r.status for r in after} <= {200, 429, 503}
        await asyncio.sleep(0.05)
    assert _round_trips(redis) > 0  # the shared bucket is used again
    after = await _wave([port], 20)
    assert any(r.status == 200 for r in after)
