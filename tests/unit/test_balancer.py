"""Endpoint selection: smooth weighted round robin and least request."""

from __future__ import annotations

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


def test_least_request_prefers_the_less_loaded() -> None:
    endpoints = [FakeEndpoint(1, in_flight=10), FakeEndpoint(1, in_flight=0)]
    lr = LeastRequest([1, 1])
    picks = Counter(lr.pick(endpoints) for _ in range(200))
    # whenever both are drawn the idle one wins; the busy one only when drawn twice
    assert picks[1] > 120
    assert picks[0] < 80


def test_least_request_single_endpoint() -> None:
    assert LeastRequest([1]).pick([FakeEndpoint(1)]) == 0
