"""The token bucket with a fake clock: exact counts, refill, caps, clocks going backwards."""

from __future__ import annotations

import math

import pytest

from gateway.core.token_bucket import BucketPolicy


@pytest.mark.parametrize(
    ("rate", "per", "burst", "seconds"),
    # (a bucket hammered never sits at its cap, where a surplus is dropped by design)
    [(10, 1.0, 5, 3.0), (100, 60.0, 20, 90.0), (3, 0.5, 2, 2.0), (0.5, 1.0, 2, 7.0)],
)
def test_constant_demand_admits_burst_plus_rate_times_t(
    rate: float, per: float, burst: int, seconds: float
) -> None:
    policy = BucketPolicy(rate, per, burst)
    bucket = policy.new(0.0)
    admitted = 0
    steps = 10_000
    for i in range(steps + 1):
        now = seconds * i / steps
        while policy.take(bucket, now):
            admitted += 1
    assert admitted == burst + math.floor(rate / per * seconds)


def test_takes_exactly_at_the_refill_interval_all_succeed() -> None:
    policy = BucketPolicy(7, 1.0, 1)
    bucket = policy.new(0.0)
    assert policy.take(bucket, 0.0)
    for i in range(1, 1001):
        assert policy.take(bucket, i / 7), i
        assert not policy.take(bucket, i / 7)


def test_burst_caps_an_idle_bucket() -> None:
    policy = BucketPolicy(10, 1.0, 3)
    bucket = policy.new(0.0)
    for _ in range(3):
        assert policy.take(bucket, 0.0)
    assert not policy.take(bucket, 0.0)
    assert policy.refill(bucket, 3600.0) == 3.0


def test_figures_for_headers() -> None:
    policy = BucketPolicy(2, 60.0, 3)  # one token every 30 s
    bucket = policy.new(0.0)
    assert policy.take(bucket, 0.0)
    assert policy.remaining(bucket) == 2
    assert policy.seconds_to_full(bucket) == pytest.approx(30.0)
    assert policy.seconds_to_token(bucket) == 0.0
    policy.take(bucket, 0.0)
    policy.take(bucket, 0.0)
    assert not policy.take(bucket, 0.0)
    assert policy.remaining(bucket) == 0
    assert policy.seconds_to_token(bucket) == pytest.approx(30.0)
    assert policy.seconds_to_full(bucket) == pytest.approx(90.0)
    policy.refill(bucket, 15.0)
    assert policy.seconds_to_token(bucket) == pytest.approx(15.0)


def test_time_going_backwards_adds_nothing() -> None:
    policy = BucketPolicy(1, 1.0, 1)
    bucket = policy.new(100.0)
    assert policy.take(bucket, 100.0)
    assert not policy.take(bucket, 50.0)
    assert not policy.take(bucket, 100.5)
    assert policy.take(bucket, 101.0)


def test_cost_above_one() -> None:
    policy = BucketPolicy(1, 1.0, 5)
    bucket = policy.new(0.0)
    assert policy.take(bucket, 0.0, cost=5)
    assert not policy.take(bucket, 4.0, cost=5)
    assert policy.take(bucket, 5.0, cost=5)


def test_invalid_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        BucketPolicy(0, 1.0, 1)
    with pytest.raises(ValueError, match="burst"):
        BucketPolicy(1, 1.0, 0)
