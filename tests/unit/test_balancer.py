"""Endpoint selection: smooth weighted round robin and least request."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from gateway.upstream.balancer import LeastRequest, RoundRobin, smooth_schedule


@dataclass
class FakeEndpoint:
    weight: int
    in_flight: int = 0


def test_smooth_schedule_interleaves_by_weight() -> None:
    order = smooth_schedule([5, 1, 1])
    assert Counter(order) == {0: 5, 1: 1, 2: 1}
    # within a round the heavy endpoint is interleaved, not picked five times in a row
    assert "000" not in "".join(map(str, order))


def test_round_robin_follows_weights_over_many_picks() -> None:
    endpoints = [FakeEndpoint(3), FakeEndpoint(1)]
    rr = RoundRobin([3, 1])
    picks = Counter(rr.pick(endpoints) for _ in range(400))
    assert picks == {0: 300, 1: 100}


def test_round_robin_reduces_large_weights() -> None:
    rr = RoundRobin([1000, 3000])
    endpoints = [FakeEndpoint(1000), FakeEndpoint(3000)]
    picks = Counter(rr.pick(endpoints) for _ in range(4))
    assert picks == {0: 1, 1: 3}


def test_least_request_never_picks_the_busier_of_two() -> None:
    # drawn with replacement, the busy one was compared with itself, and taken, a quarter of
    # the time
    endpoints = [FakeEndpoint(1, in_flight=1), FakeEndpoint(1, in_flight=0)]
    lr = LeastRequest([1, 1], rng=random.Random(7))
    assert Counter(lr.pick(endpoints) for _ in range(1000)) == {1: 1000}


def test_least_request_single_endpoint() -> None:
    assert LeastRequest([1]).pick([FakeEndpoint(1)]) == 0


def test_least_request_draws_two_distinct_endpoints() -> None:
    lr = LeastRequest([1, 1], rng=random.Random(7))
    pairs = Counter(lr.candidates() for _ in range(1000))
    assert set(pairs) == {(0, 1), (1, 0)}
    assert 400 < pairs[(0, 1)] < 600


def test_least_request_draws_by_weight_first_among_all_then_among_the_others() -> None:
    weights = [1, 2, 3, 4]
    total = sum(weights)
    lr = LeastRequest(weights, rng=random.Random(7))
    draws = 40_000
    pairs = Counter(lr.candidates() for _ in range(draws))
    assert all(a != b for a, b in pairs)
    for (a, b), seen in pairs.items():
        expected = draws * weights[a] / total * weights[b] / (total - weights[a])
        # the rarest pair, (0, 1), is expected 889 times: 15 % is over 4 standard deviations
        assert abs(seen - expected) < 0.15 * expected, ((a, b), seen, expected)
    assert len(pairs) == 12


def test_least_request_follows_weights_when_loads_are_even() -> None:
    # in flight per unit of weight equal: the first draw, by weight, wins
    endpoints = [FakeEndpoint(3, in_flight=3), FakeEndpoint(1, in_flight=1)]
    lr = LeastRequest([3, 1], rng=random.Random(7))
    picks = Counter(lr.pick(endpoints) for _ in range(4000))
    assert 2850 < picks[0] < 3150
