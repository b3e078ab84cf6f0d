"""Active health of one endpoint: thresholds of consecutive check results, nothing else.

An endpoint starts healthy — a start or a reload must not turn traffic away before the first
check, which runs at once.  `unhealthy` failures in a row make it unhealthy; `healthy` passes in
a row make it healthy again; a result of the other kind restarts the streak.
"""

from __future__ import annotations

from typing import final

from gateway.config.model import HealthCheckConfig


@final
class HealthState:
    __slots__ = ("_config", "_streak", "healthy")

    def __init__(self, config: HealthCheckConfig) -> None:
        self._config = config
        self.healthy = True
        #: consecutive results that disagree with the current state
        self._streak = 0

    def record(self, passed: bool) -> bool:
        """Count one check result; True when it changed the state."""
        if passed == self.healthy:
            self._streak = 0
            return False
        self._streak += 1
        needed = self._config.healthy if passed else self._config.unhealthy
        if self._streak < needed:
            return False
        self.healthy = passed
        self._streak = 0
        return True
