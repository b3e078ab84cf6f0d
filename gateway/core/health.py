"""Active health of one endpoint: the thresholds over consecutive check results, nothing else.

Invariants: an endpoint starts healthy (a start or a reload must not turn traffic away before the
first check, which runs at once); `unhealthy` failures in a row make a healthy endpoint unhealthy,
`healthy` passes in a row make an unhealthy one healthy again; a result that agrees with the
current state restarts the streak.  Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import final

from gateway.config.model import HealthCheckConfig


@final
class HealthState:
    __slots__ = ("_to_healthy", "_to_unhealthy", "healthy", "streak")

    def __init__(self, config: HealthCheckConfig) -> None:
        # a threshold below one would flip on nothing; treat it as one
        self._to_healthy = max(1, config.healthy)
        self._to_unhealthy = max(1, config.unhealthy)
        self.healthy = True
        #: consecutive results that disagree with `healthy`
        self.streak = 0

    def record(self, passed: bool) -> bool:
        """Count one check result; True when it flipped `healthy`."""
        if passed == self.healthy:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak < (self._to_healthy if passed else self._to_unhealthy):
            return False
        self.healthy = passed
        self.streak = 0
        return True
