"""Passive outlier detection for one upstream's endpoints, from the outcomes of real requests.

`consecutive_failures` failed requests in a row eject an endpoint; its n-th ejection in a row
lasts `ejection` * n, capped at `max_ejection`.  The count decays: every `ejection` period an
endpoint spends back in rotation takes one off n, so an endpoint that misbehaves once a day is
not punished as a repeat offender.  At most max(1, ⌊endpoints * max_ejected_percent / 100⌋)
endpoints are ejected at once (none when the percentage is 0): passive detection must never
empty an upstream by itself on a bad minute of the network.

Pure: time is passed in; the caller sets a timer for `next_readmission()`.
"""

from __future__ import annotations

from typing import final

from gateway.config.model import OutlierDetectionConfig


@final
class _Endpoint:
    __slots__ = ("admitted_at", "ejected_until", "ejections", "failures")

    def __init__(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.ejected_until: float | None = None
        self.admitted_at = 0.0


@final
class Outliers:
    __slots__ = ("_config", "_ejected", "_endpoints", "_max_ejected")

    def __init__(self, config: OutlierDetectionConfig, count: int) -> None:
        self._config = config
        self._endpoints = [_Endpoint() for _ in range(count)]
        percent = config.max_ejected_percent
        self._max_ejected = 0 if percent == 0 else max(1, count * percent // 100)
        self._ejected = 0

    def record(self, index: int, failure: bool, now: float) -> bool:
        """One request's outcome on endpoint `index`; True when this ejected it."""
        endpoint = self._endpoints[index]
        if endpoint.ejected_until is not None:
            return False
        if not failure:
            endpoint.failures = 0
            return False
        endpoint.failures += 1
        if endpoint.failures < self._config.consecutive_failures:
            return False
        if self._ejected >= self._max_ejected:
            return False  # capped: it stays in rotation, its streak keeps counting
        config = self._config
        # decay: one ejection forgiven per `ejection` period spent back in rotation
        if endpoint.ejections:
            forgiven = int((now - endpoint.admitted_at) // config.ejection)
            endpoint.ejections = max(0, endpoint.ejections - forgiven)
        endpoint.ejections += 1
        endpoint.ejected_until = now + min(
            config.max_ejection, config.ejection * endpoint.ejections
        )
        endpoint.failures = 0
        self._ejected += 1
        return True

    def readmit_due(self, now: float) -> list[int]:
        """Readmit every endpoint whose ejection has ended by `now`; their indices."""
        readmitted = []
        for index, endpoint in enumerate(self._endpoints):
            until = endpoint.ejected_until
            if until is not None and until <= now:
                endpoint.ejected_until = None
                endpoint.admitted_at = now
                endpoint.failures = 0
                self._ejected -= 1
                readmitted.append(index)
        return readmitted

    def next_readmission(self) -> float | None:
        times = [e.ejected_until for e in self._endpoints if e.ejected_until is not None]
        return min(times) if times else None

    def is_ejected(self, index: int) -> bool:
        return self._endpoints[index].ejected_until is not None

    def ejected_until(self, index: int) -> float | None:
        return self._endpoints[index].ejected_until

    def ejections(self, index: int) -> int:
        return self._endpoints[index].ejections
