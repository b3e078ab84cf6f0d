"""The circuit breaker state machine with a fake clock and a fixed random source."""

from __future__ import annotations

import pytest

from gateway.config.model import CircuitBreakerConfig, SlowCallConfig
from gateway.core.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    OPEN_ELAPSED,
    PROBE_FAILED,
    PROBES_SUCCEEDED,
    REJECTED,
    TRANSITIONS,
    TRIP,
    Breaker,
)

CONFIG = CircuitBreakerConfig(
    window=10.0, min_requests=4, failure_ratio=0.5, open_for=5.0, max_open_for=60.0,
    half_open_requests=2,
)  # fmt: skip


def _breaker(config: CircuitBreakerConfig = CONFIG, jitter: float = 0.5) -> Breaker:
    # rng 0.5 -> a jitter factor of exactly 1.0
    return Breaker(config, 0.0, rng=lambda: jitter)


def _outcomes(b: Breaker, now: float, failures: int, successes: int = 0) -> None:
    for failure in [True] * failures + [False] * successes:
        ticket = b.allow(now)
        assert ticket != REJECTED
        b.record(ticket, now, failure=failure, duration=0.01)


def _trip(b: Breaker, now: float) -> None:
    _outcomes(b, now, failures=CONFIG.min_requests)
    assert b.state == OPEN


def test_the_transition_table() -> None:
    assert TRANSITIONS == {
        (CLOSED, TRIP): OPEN,
        (OPEN, OPEN_ELAPSED): HALF_OPEN,
        (HALF_OPEN, PROBE_FAILED): OPEN,
        (HALF_OPEN, PROBES_SUCCEEDED): CLOSED,
    }
    b = _breaker()
    with pytest.raises(AssertionError, match="no transition for closed on probe_failed"):
        b._transition(PROBE_FAILED, 0.0)


def test_stays_closed_below_min_requests_even_when_all_fail() -> None:
    b = _breaker()
    _outcomes(b, 1.0, failures=3)
    assert b.state_at(1.0) == CLOSED


def test_trips_exactly_at_the_ratio() -> None:
    b = _breaker()
    _outcomes(b, 1.0, failures=1, successes=2)
    _outcomes(b, 1.0, failures=1)  # 2 of 4 = 0.5
    assert b.state == OPEN
    b2 = _breaker()
    _outcomes(b2, 1.0, failures=1, successes=3)
    _outcomes(b2, 1.0, failures=1)  # 2 of 5 < 0.5
    assert b2.state == CLOSED


def test_old_failures_slide_out_of_the_window() -> None:
    b = _breaker()
    _outcomes(b, 0.5, failures=3)
    _outcomes(b, 11.0, failures=1)  # the first three are older than 10 s
    assert b.state == CLOSED
    _outcomes(b, 11.5, failures=2, successes=1)  # 3 of 4 inside the window
    assert b.state == OPEN


def test_slow_calls_trip_too() -> None:
    config = CircuitBreakerConfig(
        min_requests=4, slow_call=SlowCallConfig(duration=1.0, ratio=0.75)
    )
    b = _breaker(config)
    for duration in (2.0, 2.0, 0.1):
        b.record(b.allow(1.0), 1.0, failure=False, duration=duration)
    assert b.state == CLOSED
    b.record(b.allow(1.0), 1.0, failure=False, duration=1.0)
    assert b.state == OPEN


def test_open_refuses_and_counts_down() -> None:
    b = _breaker()
    _trip(b, 1.0)
    assert b.allow(2.0) == REJECTED
    assert b.retry_after(2.0) == pytest.approx(4.0)
    assert b.retry_after(5.9) == pytest.approx(0.1)
    assert b.state_at(6.0) == HALF_OPEN
    assert b.retry_after(6.0) == 0.0


def test_half_open_admits_exactly_the_probes_then_closes() -> None:
    b = _breaker()
    _trip(b, 0.0)
    probes = [b.allow(5.0), b.allow(5.0)]
    assert REJECTED not in probes
    assert b.allow(5.0) == REJECTED
    b.record(probes[0], 5.1, failure=False, duration=0.1)
    assert b.state == HALF_OPEN
    b.record(probes[1], 5.2, failure=False, duration=0.1)
    assert b.state == CLOSED
    assert b.trips == 0
    assert b.describe(5.2)["window"] == {"requests": 0, "failures": 0, "slow": 0}
    _outcomes(b, 5.3, failures=3)  # a fresh window: three failures are not enough
    assert b.state == CLOSED


def test_a_failed_probe_reopens_for_twice_as_long_up_to_the_cap() -> None:
    config = CircuitBreakerConfig(min_requests=1, open_for=5.0, max_open_for=12.0)
    b = _breaker(config)
    _outcomes(b, 0.0, failures=1)
    now = 0.0
    for expected in (5.0, 10.0, 12.0, 12.0):
        assert b.retry_after(now) == pytest.approx(expected)
        now += expected
        probe = b.allow(now)
        assert probe != REJECTED
        b.record(probe, now, failure=True, duration=0.0)
        assert b.state == OPEN


@pytest.mark.parametrize(("rng", "factor"), [(0.0, 0.9), (0.999999, 1.1)])
def test_jitter_stays_within_ten_percent(rng: float, factor: float) -> None:
    b = _breaker(jitter=rng)
    _trip(b, 0.0)
    assert b.retry_after(0.0) == pytest.approx(5.0 * factor, rel=1e-5)


def test_outcomes_of_an_earlier_state_are_ignored() -> None:
    b = _breaker()
    slow = b.allow(0.0)  # admitted while closed, finishes much later
    _trip(b, 0.0)
    probe = b.allow(5.0)
    b.record(slow, 5.0, failure=True, duration=5.0)
    assert b.state == HALF_OPEN  # the stale failure did not reopen it
    b.record(probe, 5.0, failure=False, duration=0.0)
    b.record(b.allow(5.0), 5.0, failure=False, duration=0.0)
    assert b.state == CLOSED


def test_release_frees_a_probe_slot() -> None:
    b = _breaker()
    _trip(b, 0.0)
    first, second = b.allow(5.0), b.allow(5.0)
    assert b.allow(5.0) == REJECTED
    b.release(first)
    third = b.allow(5.0)
    assert third != REJECTED
    for ticket in (second, third):
        b.record(ticket, 5.0, failure=False, duration=0.0)
    assert b.state == CLOSED


def test_every_transition_is_reported_in_order() -> None:
    seen: list[tuple[int, int]] = []
    b = _breaker()
    b.on_transition = lambda before, after: seen.append((before, after))
    _trip(b, 0.0)
    probe = b.allow(5.0)
    b.record(probe, 5.0, failure=True, duration=0.0)
    b.state_at(20.0)
    for _ in range(2):
        b.record(b.allow(20.0), 20.0, failure=False, duration=0.0)
    assert seen == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]
