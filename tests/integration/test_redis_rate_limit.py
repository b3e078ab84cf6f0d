"""Leased token buckets on a real redis-server (gateway.stores.redis_leases): a slow key is
exact, a hot key costs a round trip per lease (counted in Redis's own `INFO commandstats`),
several workers sharing a key never admit more than the bucket plus what is leased and
unspent, unspent tokens go back, a refused key is refused without asking Redis again, and a
Redis that fails is a store error once the lease is spent."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.stores.base import StoreError
from gateway.stores.redis import RedisStore
from gateway.stores.redis_leases import RedisRateLimiter
from tests.support.process import async_wait_until
from tests.support.redis_server import RedisServer


@pytest.fixture
async def stores(redis: RedisServer) -> AsyncIterator[list[RedisStore]]:
    """Three stores on one Redis: three workers (or replicas) of a gateway."""
    made = [RedisStore("shared", redis.url, timeout=1.0) for _ in range(3)]
    yield made
    for store in made:
        await store.aclose()


def _limiter(store: RedisStore, rate: float, per: float, burst: int) -> RedisRateLimiter:
    limiter = store.rate_limiter(namespace="stage", rate=rate, per=per, burst=burst, max_keys=100)
    assert isinstance(limiter, RedisRateLimiter)
    return limiter


def round_trips(redis: RedisServer) -> int:
    """Scripts Redis ran: EVALSHA calls, less the one that found the script not loaded yet
    (redis-py then loads it and calls again)."""
    stats = redis.command("INFO", "commandstats")
    line = re.search(r"cmdstat_evalsha:(\S+)", stats)
    if line is None:
        return 0
    fields = dict(item.split("=") for item in line.group(1).split(","))
    return int(fields["calls"]) - int(fields.get("failed_calls", 0))


def bucket_tokens(redis: RedisServer, key: str) -> float:
    return float(redis.command("HGET", f"gw:rl:stage:{key}", "tokens").strip())


async def test_a_slow_key_is_exact_one_round_trip_a_request(
    stores: list[RedisStore], redis: RedisServer
) -> None:
    limiter = _limiter(stores[0], rate=5, per=3600, burst=5)
    verdicts = [await limiter.take("k") for _ in range(7)]
    assert [v.allowed for v in verdicts] == [True] * 5 + [False] * 2
    assert [v.remaining for v in verdicts[:5]] == [4, 3, 2, 1, 0]
    assert verdicts[5].retry_after > 600  # the next of 5 tokens an hour
    # one round trip per admitted request, and one for the refusal; the second refusal is
    # answered here (Redis said when its next token is due)
    assert round_trips(redis) == 6
    assert limiter.outstanding() == 0


async def test_a_hot_key_costs_a_round_trip_per_lease(
    stores: list[RedisStore], redis: RedisServer
) -> None:
    limiter = _limiter(stores[0], rate=1_000_000, per=1, burst=1_000_000)
    admitted = 0
    for i in range(5000):
        verdict = limiter.take_now("hot") or await limiter.take("hot")
        admitted += verdict.allowed
        if i % 50 == 0:
            await asyncio.sleep(0)  # let the lease's background refill run, as requests do
    assert admitted == 5000
    trips = round_trips(redis)
    print(f"round trips per 1000 admitted on a hot key: {1000 * trips / admitted:.1f}")
    assert trips * 1000 / admitted < 20


async def test_workers_sharing_a_key_never_admit_more_than_the_bucket(
    stores: list[RedisStore], redis: RedisServer
) -> None:
    """100 tokens an hour, three workers, 600 concurrent requests: what is admitted plus what
    is leased and unspent is never more than the 100 (the refill in the test's seconds is
    under one token), and at least 95 are admitted."""
    limiters = [_limiter(store, rate=100, per=3600, burst=100) for store in stores]

    async def one(i: int) -> bool:
        limiter = limiters[i % 3]
        verdict = limiter.take_now("shared") or await limiter.take("shared")
        return verdict.allowed

    started = time.monotonic()
    results = []
    for wave in range(6):  # waves, so each worker sees a rate and sizes its leases
        results += await asyncio.gather(*(one(i + 100 * wave) for i in range(100)))
    refill = (time.monotonic() - started) * 100 / 3600
    admitted = sum(results)
    outstanding = sum(limiter.outstanding() for limiter in limiters)
    assert admitted + outstanding <= 100 + refill + 1e-6
    assert admitted >= 95
    assert bucket_tokens(redis, "shared") < 1 + refill


async def test_unspent_tokens_go_back_when_the_limiter_closes(
    stores: list[RedisStore], redis: RedisServer
) -> None:
    limiter = _limiter(stores[0], rate=1000, per=3600, burst=1000)
    for i in range(400):
        limiter.take_now("k") or await limiter.take("k")
        if i % 20 == 0:
            await asyncio.sleep(0)
    # a refill started ahead of need lands
    for lease in limiter.leases():
        if lease.refill is not None:
            await lease.refill
    outstanding = limiter.outstanding()
    assert outstanding > 0  # a hot key holds a lease
    before = bucket_tokens(redis, "k")
    limiter.close()
    await stores[0].aclose()  # waits for the tokens to be given back
    after = bucket_tokens(redis, "k")
    assert after - before == pytest.approx(outstanding, abs=1)  # plus the refill meanwhile


async def test_an_idle_lease_goes_back_when_another_key_arrives(
    stores: list[RedisStore], redis: RedisServer
) -> None:
    limiter = _limiter(stores[0], rate=1000, per=3600, burst=1000)
    limiter.idle_seconds = 0.05
    for i in range(400):
        limiter.take_now("idle") or await limiter.take("idle")
        if i % 20 == 0:
            await asyncio.sleep(0)
    await asyncio.sleep(0.1)
    assert limiter.outstanding() > 0
    await limiter.take("other")  # a new key sweeps the idle ones
    assert len(limiter) == 1
    # given back in the background: the 400 spent of 1000, and nothing held here
    await async_wait_until(
        lambda: bucket_tokens(redis, "idle") >= 600 - 1e-6, within=5, what="tokens back"
    )
    assert bucket_tokens(redis, "idle") == pytest.approx(600, abs=1)


async def test_a_refused_key_is_refused_here_until_its_next_token(
    stores: list[RedisStore], redis: RedisServer
) -> None:
    limiter = _limiter(stores[0], rate=1, per=0.2, burst=1)  # a token every 200 ms
    assert (await limiter.take("k")).allowed
    refused = await limiter.take("k")
    assert not refused.allowed
    assert 0 < refused.retry_after <= 0.2 + 1e-9  # (now + 0.2) - later, in floats
    trips = round_trips(redis)
    for _ in range(50):
        verdict = limiter.take_now("k")
        assert verdict is not None
        assert not verdict.allowed
    assert round_trips(redis) == trips
    await asyncio.sleep(refused.retry_after + 0.01)
    assert limiter.take_now("k") is None  # due now: Redis is asked again
    assert (await limiter.take("k")).allowed


async def test_redis_gone_is_a_store_error_once_the_lease_is_spent(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r").start()
    store = RedisStore("shared", server.url, timeout=0.3)
    limiter = _limiter(store, rate=1000, per=3600, burst=1000)
    try:
        for i in range(200):
            limiter.take_now("k") or await limiter.take("k")
            if i % 20 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        held = limiter.outstanding()
        assert held > 0
        server.stop()
        # the lease in hand still answers, without Redis
        for _ in range(held):
            verdict = limiter.take_now("k")
            assert verdict is not None
            assert verdict.allowed
        started = time.monotonic()
        with pytest.raises(StoreError):
            await limiter.take("k")
        assert time.monotonic() - started < 1.0
    finally:
        limiter.close()
        await store.aclose()
        server.stop()


async def test_an_evicted_key_gives_its_lease_back(
    stores: list[RedisStore], redis: RedisServer
) -> None:
    """max_keys 1: a second key evicts the first, whose unspent tokens go back to Redis."""
    store = stores[0]
    limiter = store.rate_limiter(namespace="stage", rate=1000, per=3600, burst=1000, max_keys=1)
    assert isinstance(limiter, RedisRateLimiter)
    for i in range(400):
        limiter.take_now("first") or await limiter.take("first")
        if i % 20 == 0:
            await asyncio.sleep(0)
    await async_wait_until(lambda: limiter.outstanding() > 0, within=5, what="a lease held")
    await async_wait_until(
        lambda: all(lease.refill is None for lease in limiter.leases()),
        within=5,
        what="no refill in flight",
    )
    held = limiter.outstanding()
    before = bucket_tokens(redis, "first")
    await limiter.take("second")
    assert len(limiter) == 1
    await async_wait_until(
        lambda: bucket_tokens(redis, "first") >= before + held - 1e-6,
        within=5,
        what="the evicted lease given back",
    )
    assert bucket_tokens(redis, "first") == pytest.approx(before + held, abs=1)


async def test_a_lease_with_requests_waiting_on_it_is_not_swept(
    stores: list[RedisStore], redis: RedisServer
) -> None:
    """Requests woken by a refill run after it: a new key's sweep meanwhile must not give the
    lease back under them (they would spend from a lease no longer held: a 500 once seen)."""
    limiter = _limiter(stores[0], rate=1000, per=3600, burst=1000)
    limiter.idle_seconds = 0.05
    await limiter.take("busy")
    [lease] = limiter.leases()
    lease.waiting += 1  # a request woken by the refill, not run yet
    await asyncio.sleep(0.1)  # idle for longer than idle_seconds
    await limiter.take("other")  # a new key sweeps the idle leases
    assert len(limiter) == 2
    assert lease in limiter.leases()
    lease.waiting -= 1
    await asyncio.sleep(0.1)
    await limiter.take("third")
    assert lease not in limiter.leases()  # idle and no longer waited on: given back


async def test_a_lease_granted_after_the_limiter_closed_is_spent_without_it(
    stores: list[RedisStore], redis: RedisServer
) -> None:
    """A refill that lands after a reload or shutdown closed the limiter: its waiters are
    answered from the grant, and the closed limiter holds nothing again."""
    limiter = _limiter(stores[0], rate=1000, per=3600, burst=1000)
    await limiter.take("k")
    await limiter.take("j")  # "k" is no longer the latest key
    [lease, _] = limiter.leases()
    limiter.close()
    lease.tokens = 2  # the grant of a refill under way at the close
    verdict = limiter._answer("k", lease)
    assert verdict is not None
    assert verdict.allowed
    assert len(limiter) == 0
