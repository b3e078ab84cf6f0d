"""Active-health thresholds: a streak of results flips the state, nothing less."""

from __future__ import annotations

from gateway.config.model import HealthCheckConfig
from gateway.core.health import HealthState


def test_starts_healthy() -> None:
    assert HealthState(HealthCheckConfig()).healthy


def test_unhealthy_after_exactly_the_failure_threshold() -> None:
    state = HealthState(HealthCheckConfig(unhealthy=3, healthy=2))
    assert [state.record(False) for _ in range(3)] == [False, False, True]
    assert not state.healthy


def test_healthy_again_after_exactly_the_pass_threshold() -> None:
    state = HealthState(HealthCheckConfig(unhealthy=1, healthy=2))
    assert state.record(False)
    assert [state.record(True) for _ in range(2)] == [False, True]
    assert state.healthy


def test_a_result_of_the_other_kind_restarts_the_streak() -> None:
    state = HealthState(HealthCheckConfig(unhealthy=2, healthy=2))
    assert not state.record(False)
    assert not state.record(True)  # streak of failures broken
    assert not state.record(False)
    assert state.healthy
    assert state.record(False)
    assert not state.record(True)
    assert not state.record(False)  # streak of passes broken
    assert not state.record(True)
    assert state.record(True)
    assert state.healthy


def test_results_that_agree_change_nothing() -> None:
    state = HealthState(HealthCheckConfig(unhealthy=1, healthy=1))
    assert not any(state.record(True) for _ in range(5))
    assert state.record(False)
    assert not any(state.record(False) for _ in range(5))
    assert not state.healthy
