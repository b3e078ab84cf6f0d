"""Passive outlier detection with time passed in."""

from __future__ import annotations

from gateway.config.model import OutlierDetectionConfig
from gateway.core.outlier import Outliers

CONFIG = OutlierDetectionConfig(
    consecutive_failures=3, ejection=10.0, max_ejection=25.0, max_ejected_percent=50
)


def _fail(o: Outliers, index: int, now: float, times: int) -> list[bool]:
    return [o.record(index, True, now) for _ in range(times)]


def test_ejects_after_exactly_n_consecutive_failures() -> None:
    o = Outliers(CONFIG, 4)
    assert _fail(o, 0, 0.0, 3) == [False, False, True]
    assert o.is_ejected(0)
    assert o.ejected_until(0) == 10.0
    assert o.ejections(0) == 1


def test_a_success_restarts_the_streak() -> None:
    o = Outliers(CONFIG, 4)
    _fail(o, 0, 0.0, 2)
    assert not o.record(0, False, 0.0)
    assert _fail(o, 0, 0.0, 2) == [False, False]
    assert not o.is_ejected(0)


def test_readmission_and_growing_ejections_up_to_the_cap() -> None:
    o = Outliers(CONFIG, 4)
    now = 0.0
    for expected in (10.0, 20.0, 25.0):
        assert _fail(o, 1, now, 3)[-1]
        assert o.ejected_until(1) == now + expected
        assert o.next_readmission() == now + expected
        assert o.readmit_due(now + expected - 0.01) == []
        now += expected
        assert o.readmit_due(now) == [1]
        assert not o.is_ejected(1)
        assert o.next_readmission() is None


def test_ejections_decay_while_back_in_rotation() -> None:
    o = Outliers(CONFIG, 4)
    _fail(o, 0, 0.0, 3)
    o.readmit_due(10.0)
    _fail(o, 0, 10.0, 3)  # right away: the second ejection is twice as long
    assert o.ejections(0) == 2
    o.readmit_due(30.0)
    _fail(o, 0, 50.0, 3)  # 20 s back in rotation forgive two: a first offence again
    assert o.ejections(0) == 1
    assert o.ejected_until(0) == 60.0


def test_max_ejected_percent_caps_how_many_are_out() -> None:
    o = Outliers(CONFIG, 4)
    assert _fail(o, 0, 0.0, 3)[-1]
    assert _fail(o, 1, 0.0, 3)[-1]
    assert _fail(o, 2, 0.0, 5) == [False] * 5  # 2 of 4 are out: no third
    o.readmit_due(10.0)
    assert o.record(2, True, 10.0)  # its streak kept counting; now there is room


def test_a_single_endpoint_may_be_ejected_but_zero_percent_never_ejects() -> None:
    assert _fail(Outliers(CONFIG, 1), 0, 0.0, 3)[-1]
    never = OutlierDetectionConfig(consecutive_failures=1, max_ejected_percent=0)
    assert _fail(Outliers(never, 3), 0, 0.0, 5) == [False] * 5


def test_outcomes_while_ejected_are_ignored() -> None:
    o = Outliers(CONFIG, 2)
    _fail(o, 0, 0.0, 3)
    assert not o.record(0, False, 1.0)
    assert o.is_ejected(0)
