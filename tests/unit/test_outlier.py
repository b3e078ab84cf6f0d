"""Passive outlier detection, with time passed in."""

from __future__ import annotations

from gateway.config.model import OutlierDetectionConfig
from gateway.core.outlier import Outliers

# 3 failures eject; 10 s, 20 s, then capped at 25 s
CONFIG = OutlierDetectionConfig(
    consecutive_failures=3, ejection=10.0, max_ejection=25.0, max_ejected_percent=50
)


def _fail(o: Outliers, index: int, now: float, times: int) -> list[bool]:
    return [o.record(index, True, now) for _ in range(times)]


def _eject(o: Outliers, index: int, now: float) -> None:
    assert _fail(o, index, now, CONFIG.consecutive_failures)[-1]


def test_ejects_after_exactly_n_consecutive_failures() -> None:
    o = Outliers(CONFIG, 4)
    assert _fail(o, 0, 0.0, 3) == [False, False, True]
    assert o.is_ejected(0)
    assert o.ejected_until(0) == 10.0
    assert o.ejections(0) == 1
    assert not o.is_ejected(1)
    assert o.ejected_until(1) is None
    assert o.ejections(1) == 0


def test_a_success_in_between_restarts_the_streak() -> None:
    o = Outliers(CONFIG, 4)
    _fail(o, 0, 0.0, 2)
    assert not o.record(0, False, 0.0)
    assert _fail(o, 0, 0.0, 2) == [False, False]
    assert not o.is_ejected(0)
    assert o.record(0, True, 0.0)


def test_streaks_are_per_endpoint() -> None:
    o = Outliers(CONFIG, 4)
    _fail(o, 0, 0.0, 2)
    _fail(o, 1, 0.0, 2)
    assert o.record(0, True, 0.0)
    assert not o.is_ejected(1)


def test_outcomes_while_ejected_are_ignored() -> None:
    o = Outliers(CONFIG, 2)
    _eject(o, 0, 0.0)
    assert _fail(o, 0, 1.0, 5) == [False] * 5
    assert not o.record(0, False, 1.0)
    assert o.ejected_until(0) == 10.0
    assert o.ejections(0) == 1


def test_readmission_timing() -> None:
    o = Outliers(CONFIG, 4)
    assert o.next_readmission() is None
    _eject(o, 0, 0.0)
    _eject(o, 1, 4.0)
    assert o.next_readmission() == 10.0
    assert o.readmit_due(9.99) == []
    assert o.readmit_due(10.0) == [0]
    assert not o.is_ejected(0)
    assert o.ejected_until(0) is None
    assert o.next_readmission() == 14.0
    assert o.readmit_due(100.0) == [1]
    assert o.next_readmission() is None
    assert o.readmit_due(200.0) == []


def test_readmitted_endpoint_starts_a_fresh_streak() -> None:
    o = Outliers(CONFIG, 2)
    _eject(o, 0, 0.0)
    o.readmit_due(10.0)
    assert _fail(o, 0, 10.0, 3) == [False, False, True]


def test_consecutive_ejections_grow_up_to_max_ejection() -> None:
    o = Outliers(CONFIG, 4)
    now = 0.0
    for n, length in ((1, 10.0), (2, 20.0), (3, 25.0), (4, 25.0)):
        _eject(o, 1, now)  # at once after readmission: no decay
        assert o.ejections(1) == n
        assert o.ejected_until(1) == now + length
        assert o.next_readmission() == now + length
        now += length
        assert o.readmit_due(now) == [1]


def test_each_ejection_period_admitted_takes_one_off() -> None:
    o = Outliers(CONFIG, 4)
    _eject(o, 0, 0.0)
    o.readmit_due(10.0)
    _eject(o, 0, 10.0)
    o.readmit_due(30.0)
    _eject(o, 0, 30.0)
    assert o.ejections(0) == 3
    o.readmit_due(55.0)
    # 19.5 s admitted is one whole period: n goes 3 -> 2, this ejection is the third again
    _eject(o, 0, 74.5)
    assert o.ejections(0) == 3
    assert o.ejected_until(0) == 99.5
    o.readmit_due(99.5)
    # 20 s is two periods: 3 -> 1, this is the second
    _eject(o, 0, 119.5)
    assert o.ejections(0) == 2
    assert o.ejected_until(0) == 139.5


def test_admitted_for_ejection_times_n_is_a_first_offence_again() -> None:
    o = Outliers(CONFIG, 4)
    _eject(o, 0, 0.0)
    o.readmit_due(10.0)
    _eject(o, 0, 10.0)
    assert o.ejections(0) == 2
    o.readmit_due(30.0)
    _eject(o, 0, 50.0)  # admitted 20 s = ejection * 2
    assert o.ejections(0) == 1
    assert o.ejected_until(0) == 60.0
    o.readmit_due(60.0)
    _eject(o, 0, 1000.0)  # far longer: still not below a first offence
    assert o.ejections(0) == 1


def test_max_ejected_percent_caps_how_many_are_out() -> None:
    o = Outliers(CONFIG, 4)  # 50 % of 4: two at once
    _eject(o, 0, 0.0)
    _eject(o, 1, 0.0)
    assert _fail(o, 2, 0.0, 5) == [False] * 5
    assert not o.is_ejected(2)
    assert o.readmit_due(10.0) == [0, 1]
    # its streak kept counting while it was held in: the next failure ejects it
    assert o.record(2, True, 10.0)


def test_a_capped_endpoint_is_reset_by_a_success() -> None:
    o = Outliers(CONFIG, 2)  # 50 % of 2: one at once
    _eject(o, 0, 0.0)
    _fail(o, 1, 0.0, 4)
    assert not o.record(1, False, 0.0)
    o.readmit_due(10.0)
    assert _fail(o, 1, 10.0, 3) == [False, False, True]


def test_one_endpoint_may_be_ejected_at_any_percentage() -> None:
    # max(1, floor(1 * 50 / 100)) = 1
    assert _fail(Outliers(CONFIG, 1), 0, 0.0, 3)[-1]
    low = OutlierDetectionConfig(consecutive_failures=1, max_ejected_percent=10)
    o = Outliers(low, 5)  # floor(0.5) = 0, but one is always allowed
    assert o.record(0, True, 0.0)
    assert not o.record(1, True, 0.0)


def test_zero_percent_never_ejects() -> None:
    never = OutlierDetectionConfig(consecutive_failures=1, max_ejected_percent=0)
    o = Outliers(never, 3)
    assert _fail(o, 0, 0.0, 5) == [False] * 5
    assert o.next_readmission() is None


def test_hundred_percent_may_eject_every_endpoint() -> None:
    every = OutlierDetectionConfig(consecutive_failures=1, max_ejected_percent=100)
    o = Outliers(every, 3)
    assert [o.record(i, True, 0.0) for i in range(3)] == [True, True, True]
