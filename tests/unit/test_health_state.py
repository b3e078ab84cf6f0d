"""Active-health thresholds: streaks of results flip the state, nothing less."""

from __future__ import annotations

from gateway.config.model import HealthCheckConfig
from gateway.core.health import HealthState


def test_starts_healthy_and_needs_a_streak_of_failures() -> None:
    state = HealthState(HealthCheckConfig(unhealthy=3, healthy=2))
    assert state.healthy
    assert [state.record(False) for _ in range(3)] == [False, False, True]
    assert not state.healthy


def test_the_other_result_restarts_the_streak() -> None:
    state = HealthState(HealthCheckConfig(unhealthy=2, healthy=2))
    state.record(False)
    state.record(True)
    assert not state.record(False)
    assert state.healthy
    assert state.record(False)
    assert not state.record(True)
    assert not state.record(False)  # the pass streak was broken
    assert not state.record(True)
    assert state.record(True)
    assert state.healthy


def test_results_that_agree_change_nothing() -> None:
    state = HealthState(HealthCheckConfig(unhealthy=1, healthy=1))
    assert not any(state.record(True) for _ in range(5))
    assert state.record(False)
    assert not state.record(False)
