"""Weights over real sockets: a route's 9:1 split between two upstreams, and 9:1 endpoint weights
within one upstream, counted by the upstreams themselves over 1,000 requests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from fractions import Fraction
from math import comb
from pathlib import Path

import aiohttp
import pytest

from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.faulty import FaultyUpstream, faulty_upstreams
from tests.support.gateway import port_of, running_gateway

REQUESTS = 1000
CLIENTS = 4
#: the chance, per run, that a correct gateway fails the split test
FALSE_FAILURE = Fraction(1, 100_000)


def binomial_bounds(n: int, p: Fraction, alpha: Fraction) -> tuple[int, int]:
    """The narrowest [lo, hi] with P(X < lo) <= alpha/2 and P(X > hi) <= alpha/2 for
    X ~ Binomial(n, p), computed exactly: P(X = k) = C(n, k) p^k (1-p)^(n-k)."""
    pmf = [comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    lo, below = 0, Fraction(0)
    while below + pmf[lo] <= alpha / 2:
        below += pmf[lo]
        lo += 1
    hi, above = n, Fraction(0)
    while above + pmf[hi] <= alpha / 2:
        above += pmf[hi]
        hi -= 1
    return lo, hi


# The light side of a 9:1 split gets X ~ Binomial(1000, 1/10) requests: mean 100, sd
# sqrt(1000 * 0.1 * 0.9) = 9.49.  Exactly (math.comb, in fractions):
#   P(X < 61) = sum(C(1000, k) 0.1^k 0.9^(1000-k) for k = 0..60)     = 4.38e-6
#   P(X > 144) = sum(C(1000, k) 0.1^k 0.9^(1000-k) for k = 145..1000) = 4.45e-6
# so a correct gateway lands outside [61, 144] with probability 8.82e-6 < 1e-5 (narrowing by one
# either side would push that tail past 5e-6).  A split that ignores the weights gives
# X ~ Binomial(1000, 1/2), inside [61, 144] with probability 4e-124.
LIGHT_BOUNDS = (61, 144)


def test_the_bounds_are_the_binomial_ones() -> None:
    lo, hi = LIGHT_BOUNDS
    assert binomial_bounds(REQUESTS, Fraction(1, 10), FALSE_FAILURE) == LIGHT_BOUNDS
    p = Fraction(1, 10)
    pmf = [comb(REQUESTS, k) * p**k * (1 - p) ** (REQUESTS - k) for k in range(REQUESTS + 1)]
    assert sum(pmf[:lo]) + sum(pmf[hi + 1 :]) < FALSE_FAILURE


async def _hammer(port: int) -> list[int]:
    """REQUESTS requests from CLIENTS keep-alive clients; their statuses."""
    left = REQUESTS
    statuses: list[int] = []

    async def client() -> None:
        nonlocal left
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while left > 0:
                left -= 1
                async with session.get(f"http://127.0.0.1:{port}/x") as response:
                    await response.read()
                    statuses.append(response.status)

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return statuses


def _route_split(heavy: FaultyUpstream, light: FaultyUpstream) -> str:
    return gateway_yaml(
        upstreams={"heavy": upstream_to(heavy.url), "light": upstream_to(light.url)},
        routes=[route("app", [{"name": "heavy", "weight": 9}, {"name": "light", "weight": 1}])],
    )


def _endpoint_weights(heavy: FaultyUpstream, light: FaultyUpstream) -> str:
    endpoints = [{"url": heavy.url, "weight": 9}, {"url": light.url, "weight": 1}]
    return gateway_yaml(upstreams={"app": upstream_to(*endpoints)}, routes=[route("app", "app")])


@pytest.mark.parametrize(
    ("config", "bounds"),
    [
        # a weighted draw per request: the binomial bounds above
        pytest.param(_route_split, LIGHT_BOUNDS, id="route-split-9-1"),
        # smooth weighted round robin: 100 whole rounds of ten, one of them to the light side
        pytest.param(_endpoint_weights, (100, 100), id="endpoint-weights-9-1"),
    ],
)
async def test_a_9_to_1_weighting_sends_a_tenth_to_the_light_side(
    tmp_path: Path,
    config: Callable[[FaultyUpstream, FaultyUpstream], str],
    bounds: tuple[int, int],
) -> None:
    async with (
        faulty_upstreams("heavy", "light") as [heavy, light],
        running_gateway(tmp_path, config(heavy, light)) as gw,
    ):
        statuses = await _hammer(port_of(gw))
    assert statuses == [200] * REQUESTS
    assert heavy.total + light.total == REQUESTS
    lo, hi = bounds
    assert lo <= light.total <= hi, (heavy.total, light.total)
