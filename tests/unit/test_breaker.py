"""gateway.core.breaker: the circuit breaker state machine, with a fake clock and a fixed rng."""

from __future__ import annotations

import pytest

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
from gateway.stages.circuit_breaker import CircuitBreakerConfig, SlowCallConfig

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
    _outcomes(b, now, failures=b.config.min_requests)
    assert b.state_at(now) == OPEN


def _probe(b: Breaker, now: float, *, failure: bool) -> None:
    ticket = b.allow(now)
    assert ticket != REJECTED
    b.record(ticket, now, failure=failure, duration=0.0)


# -- the table ---------------------------------------------------------------------------------


def test_the_transition_table_lists_exactly_the_four_transitions() -> None:
    assert TRANSITIONS == {
        (CLOSED, TRIP): OPEN,
        (OPEN, OPEN_ELAPSED): HALF_OPEN,
        (HALF_OPEN, PROBE_FAILED): OPEN,
        (HALF_OPEN, PROBES_SUCCEEDED): CLOSED,
    }
    assert (CLOSED, PROBE_FAILED) not in TRANSITIONS
    assert (OPEN, PROBES_SUCCEEDED) not in TRANSITIONS


@pytest.mark.parametrize(("start", "event"), sorted(TRANSITIONS))
def test_each_listed_transition_goes_where_the_table_says(start: int, event: str) -> None:
    b = _breaker()
    b.state = start
    b._transition(event, 0.0)
    assert b.state == TRANSITIONS[start, event]


@pytest.mark.parametrize(
    ("start", "event"),
    [
        (CLOSED, PROBE_FAILED),
        (CLOSED, OPEN_ELAPSED),
        (CLOSED, PROBES_SUCCEEDED),
        (OPEN, TRIP),
        (OPEN, PROBE_FAILED),
        (HALF_OPEN, TRIP),
        (HALF_OPEN, OPEN_ELAPSED),
    ],
)
def test_a_pair_outside_the_table_raises(start: int, event: str) -> None:
    b = _breaker()
    b.state = start
    with pytest.raises(AssertionError, match=f"no transition for .* on {event}"):
        b._transition(event, 0.0)
    assert b.state == start


# -- closed: the window ------------------------------------------------------------------------


def test_stays_closed_below_min_requests_even_when_all_fail() -> None:
    b = _breaker()
    _outcomes(b, 1.0, failures=3)
    assert b.state_at(1.0) == CLOSED
    _outcomes(b, 1.0, failures=1)
    assert b.state_at(1.0) == OPEN


def test_trips_exactly_at_the_ratio() -> None:
    b = _breaker()
    _outcomes(b, 1.0, failures=1, successes=2)
    _outcomes(b, 1.0, failures=1)  # 2 of 4 = 0.5
    assert b.state_at(1.0) == OPEN
    below = _breaker()
    _outcomes(below, 1.0, failures=1, successes=3)
    _outcomes(below, 1.0, failures=1)  # 2 of 5 < 0.5
    assert below.state_at(1.0) == CLOSED


def test_a_ratio_that_does_not_multiply_exactly_still_trips_at_it() -> None:
    # 0.14 * 50 is 7.000000000000001 in floats; 7 of 50 is exactly 14 %
    b = _breaker(CircuitBreakerConfig(min_requests=50, failure_ratio=0.14))
    _outcomes(b, 1.0, failures=6, successes=43)
    _outcomes(b, 1.0, failures=1)
    assert b.state_at(1.0) == OPEN


def test_old_failures_slide_out_of_the_window() -> None:
    b = _breaker()
    _outcomes(b, 0.5, failures=3)
    _outcomes(b, 11.0, failures=1)  # the first three are older than 10 s
    assert b.state_at(11.0) == CLOSED
    assert b.describe(11.0)["window"] == {"requests": 1, "failures": 1, "slow": 0}
    _outcomes(b, 11.5, failures=2, successes=1)  # 3 of 4 inside the window
    assert b.state_at(11.5) == OPEN


def test_a_long_quiet_spell_empties_the_whole_window() -> None:
    b = _breaker()
    _outcomes(b, 1.0, failures=1, successes=2)
    _outcomes(b, 5.0, failures=0, successes=1)
    assert b.describe(5.0)["window"]["requests"] == 4
    assert b.describe(1_000_000.0)["window"] == {"requests": 0, "failures": 0, "slow": 0}


def test_a_clock_stepping_back_counts_into_the_newest_bucket() -> None:
    b = _breaker()
    _outcomes(b, 9.5, failures=2)
    _outcomes(b, 3.0, failures=2)  # still counted: 4 of 4 in the window
    assert b.state_at(3.0) == OPEN


def test_slow_calls_trip_too() -> None:
    config = CircuitBreakerConfig(
        min_requests=4, slow_call=SlowCallConfig(duration=1.0, ratio=0.75)
    )
    b = _breaker(config)
    for duration in (2.0, 2.0, 0.1):
        b.record(b.allow(1.0), 1.0, failure=False, duration=duration)
    assert b.state_at(1.0) == CLOSED
    b.record(b.allow(1.0), 1.0, failure=False, duration=1.0)  # 1.0 >= duration: slow
    assert b.state_at(1.0) == OPEN


def test_slow_calls_do_not_count_without_slow_call() -> None:
    b = _breaker()
    for _ in range(10):
        b.record(b.allow(1.0), 1.0, failure=False, duration=1e9)
    assert b.state_at(1.0) == CLOSED
    assert b.describe(1.0)["window"]["slow"] == 0


# -- open ---------------------------------------------------------------------------------------


def test_open_refuses_and_retry_after_counts_down() -> None:
    b = _breaker()
    _trip(b, 1.0)
    assert b.allow(2.0) == REJECTED
    assert b.retry_after(2.0) == pytest.approx(4.0)
    assert b.allow(5.9) == REJECTED
    assert b.retry_after(5.9) == pytest.approx(0.1)
    assert b.state_at(6.0) == HALF_OPEN
    assert b.retry_after(6.0) == 0.0


def test_retry_after_is_zero_when_closed() -> None:
    b = _breaker()
    assert b.retry_after(3.0) == 0.0


# -- half-open ---------------------------------------------------------------------------------


def test_half_open_admits_exactly_the_probes_until_they_resolve() -> None:
    b = _breaker(CircuitBreakerConfig(min_requests=1, half_open_requests=3))
    _trip(b, 0.0)
    probes = [b.allow(5.0) for _ in range(3)]
    assert REJECTED not in probes
    assert b.allow(5.0) == REJECTED
    b.record(probes[0], 5.1, failure=False, duration=0.1)
    assert b.allow(5.1) == REJECTED  # a resolved probe does not make room for another
    b.record(probes[1], 5.2, failure=False, duration=0.1)
    assert b.state_at(5.2) == HALF_OPEN
    b.record(probes[2], 5.3, failure=False, duration=0.1)
    assert b.state_at(5.3) == CLOSED


def test_all_probes_succeeding_closes_and_resets_the_counters() -> None:
    b = _breaker()
    _trip(b, 0.0)
    _probe(b, 5.0, failure=True)  # one more trip so the count has something to reset
    assert b.trips == 2
    _probe(b, 15.0, failure=False)
    _probe(b, 15.0, failure=False)
    assert b.state_at(15.0) == CLOSED
    assert b.trips == 0
    assert b.describe(15.0)["window"] == {"requests": 0, "failures": 0, "slow": 0}
    _outcomes(b, 15.1, failures=3)  # a fresh window: three failures are not enough
    assert b.state_at(15.1) == CLOSED
    _outcomes(b, 15.1, failures=1)
    assert b.retry_after(15.1) == pytest.approx(5.0)  # back to the first open period


def test_a_slow_probe_counts_as_failed() -> None:
    config = CircuitBreakerConfig(min_requests=1, slow_call=SlowCallConfig(duration=1.0, ratio=1))
    b = _breaker(config)
    _trip(b, 0.0)
    ticket = b.allow(5.0)
    b.record(ticket, 7.0, failure=False, duration=2.0)
    assert b.state_at(7.0) == OPEN
    assert b.retry_after(7.0) == pytest.approx(10.0)


def test_a_failed_probe_reopens_for_twice_as_long_up_to_the_cap() -> None:
    b = _breaker(CircuitBreakerConfig(min_requests=1, open_for=5.0, max_open_for=12.0))
    _trip(b, 0.0)
    now = 0.0
    for expected in (5.0, 10.0, 12.0, 12.0):
        assert b.retry_after(now) == pytest.approx(expected)
        now += expected
        _probe(b, now, failure=True)
        assert b.state_at(now) == OPEN


def test_a_long_outage_stays_at_the_cap() -> None:
    # 2 ** 1100 would overflow a float: the period must be capped, not computed
    b = _breaker(CircuitBreakerConfig(min_requests=1, open_for=1.0, max_open_for=60.0))
    _trip(b, 0.0)
    now = 0.0
    for _ in range(1100):
        now += b.retry_after(now)
        _probe(b, now, failure=True)
    assert b.trips == 1101
    assert b.retry_after(now) == pytest.approx(60.0)


def test_open_for_above_the_cap_is_capped_from_the_first_trip() -> None:
    b = _breaker(CircuitBreakerConfig(min_requests=1, open_for=90.0, max_open_for=60.0))
    _trip(b, 0.0)
    assert b.retry_after(0.0) == pytest.approx(60.0)


@pytest.mark.parametrize(("rng", "factor"), [(0.0, 0.9), (0.999999, 1.1)])
def test_jitter_stays_within_ten_percent(rng: float, factor: float) -> None:
    b = _breaker(jitter=rng)
    _trip(b, 0.0)
    assert b.retry_after(0.0) == pytest.approx(5.0 * factor, rel=1e-5)


# -- tickets -----------------------------------------------------------------------------------


def test_an_outcome_admitted_while_closed_is_ignored_later() -> None:
    b = _breaker()
    slow = b.allow(0.0)  # admitted while closed, finishes much later
    _trip(b, 0.0)
    probe = b.allow(5.0)
    b.record(slow, 5.0, failure=True, duration=5.0)
    assert b.state_at(5.0) == HALF_OPEN  # the stale failure did not reopen it
    b.record(probe, 5.0, failure=False, duration=0.0)
    _probe(b, 5.0, failure=False)
    assert b.state_at(5.0) == CLOSED
    b.record(slow, 5.0, failure=False, duration=5.0)
    assert b.describe(5.0)["window"]["requests"] == 0  # nor is it counted once closed again


def test_a_probe_of_an_earlier_half_open_period_is_ignored() -> None:
    b = _breaker()
    _trip(b, 0.0)
    late = b.allow(5.0)
    _probe(b, 5.0, failure=True)  # the other probe fails: open again until 15
    assert b.state_at(15.0) == HALF_OPEN
    b.record(late, 15.0, failure=False, duration=10.0)
    _probe(b, 15.0, failure=False)
    assert b.state_at(15.0) == HALF_OPEN  # the late success did not count as one of the two
    b.record(late, 15.0, failure=True, duration=10.0)
    assert b.state_at(15.0) == HALF_OPEN  # nor does a late failure reopen it
    _probe(b, 15.0, failure=False)
    assert b.state_at(15.0) == CLOSED


def test_recording_a_rejected_ticket_does_nothing() -> None:
    b = _breaker()
    _trip(b, 0.0)
    assert b.allow(1.0) == REJECTED
    b.record(REJECTED, 1.0, failure=False, duration=0.0)
    b.release(REJECTED)
    assert b.state_at(1.0) == OPEN


def test_release_frees_a_probe_slot() -> None:
    b = _breaker()
    _trip(b, 0.0)
    first, second = b.allow(5.0), b.allow(5.0)
    assert b.allow(5.0) == REJECTED
    b.release(first)
    third = b.allow(5.0)
    assert third != REJECTED
    assert b.allow(5.0) == REJECTED
    for ticket in (second, third):
        b.record(ticket, 5.0, failure=False, duration=0.0)
    assert b.state_at(5.0) == CLOSED


def test_releasing_a_stale_ticket_frees_nothing() -> None:
    b = _breaker()
    _trip(b, 0.0)
    old = b.allow(5.0)
    _probe(b, 5.0, failure=True)
    assert b.state_at(15.0) == HALF_OPEN
    b.allow(15.0)
    b.allow(15.0)
    b.release(old)
    assert b.allow(15.0) == REJECTED


# -- reporting ---------------------------------------------------------------------------------


def test_every_transition_is_reported_in_order() -> None:
    seen: list[tuple[int, int]] = []
    b = _breaker()
    b.on_transition = lambda before, after: seen.append((before, after))
    _trip(b, 0.0)
    _probe(b, 5.0, failure=True)
    assert b.state_at(20.0) == HALF_OPEN
    _probe(b, 20.0, failure=False)
    _probe(b, 20.0, failure=False)
    assert seen == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]


def test_describe() -> None:
    b = _breaker()
    _outcomes(b, 1.0, failures=1, successes=1)
    assert b.describe(1.0) == {
        "state": "closed",
        "window": {"requests": 2, "failures": 1, "slow": 0},
        "open_remaining": None,
        "consecutive_trips": 0,
    }
    _outcomes(b, 1.0, failures=2)
    opened = b.describe(3.0)
    assert (opened["state"], opened["consecutive_trips"]) == ("open", 1)
    assert opened["open_remaining"] == pytest.approx(3.0)
    assert b.describe(6.0)["state"] == "half_open"
