"""The memory store's rate limiter: exact under concurrency, keys apart, LRU bound."""

from __future__ import annotations

import asyncio

import pytest

from gateway.stores.memory import MemoryRateLimiter, MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _limiter(clock: Clock, rate: float, burst: int, max_keys: int = 100) -> MemoryRateLimiter:
    limiter = MemoryStore(clock).rate_limiter(
        namespace="t", rate=rate, per=1.0, burst=burst, max_keys=max_keys
    )
    assert isinstance(limiter, MemoryRateLimiter)
    return limiter


async def test_exact_under_concurrency() -> None:
    clock = Clock()
    limiter = _limiter(clock, rate=20, burst=10)
    admitted = 0

    async def client() -> None:
        nonlocal admitted
        for _ in range(5):
            verdict = await limiter.take("hot")
            admitted += verdict.allowed
            await asyncio.sleep(0)  # let the other clients interleave

    for step in range(31):  # 3 s in steps of 0.1 s
        clock.now = step / 10
        await asyncio.gather(*(client() for _ in range(50)))
    assert admitted == 10 + 20 * 3


async def test_verdict_figures() -> None:
    clock = Clock()
    limiter = _limiter(clock, rate=1, burst=2)
    first = await limiter.take("k")
    assert (first.allowed, first.remaining, first.retry_after) == (True, 1, 0.0)
    assert first.reset_after == 1.0
    await limiter.take("k")
    refused = await limiter.take("k")
    assert (refused.allowed, refused.remaining) == (False, 0)
    assert refused.retry_after == pytest.approx(1.0)
    assert refused.reset_after == 2.0


async def test_keys_are_independent() -> None:
    limiter = _limiter(Clock(), rate=1, burst=1)
    assert (await limiter.take("a")).allowed
    assert not (await limiter.take("a")).allowed
    assert (await limiter.take("b")).allowed


async def test_least_recently_used_key_is_evicted_at_max_keys() -> None:
    limiter = _limiter(Clock(), rate=1, burst=1, max_keys=2)
    assert (await limiter.take("a")).allowed
    assert (await limiter.take("b")).allowed
    assert not (await limiter.take("a")).allowed  # "a" is now the most recently used
    assert (await limiter.take("c")).allowed  # evicts "b"
    assert len(limiter) == 2
    assert not (await limiter.take("a")).allowed  # kept its (empty) bucket
    assert (await limiter.take("b")).allowed  # came back full


async def test_close_forgets_every_bucket() -> None:
    limiter = _limiter(Clock(), rate=1, burst=1)
    await limiter.take("a")
    limiter.close()
    assert len(limiter) == 0
    assert (await limiter.take("a")).allowed
