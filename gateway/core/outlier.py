"""Passive outlier detection for one upstream's endpoints, from the outcomes of real requests.

Invariants:
- `consecutive_failures` failed requests in a row eject an endpoint; a success restarts the
  streak; outcomes recorded while it is ejected are ignored (they came from requests that were
  already in flight, or from nowhere).
- Its n-th consecutive ejection lasts `ejection` * n, capped at `max_ejection`.
- Decay: every whole `ejection` period an endpoint spends back in rotation takes one off n
  (never below 0), applied when it is ejected again.  So after `ejection` * n admitted, n has
  reached 0 and the next ejection is a first offence again; an endpoint that misbehaves once a
  day is not punished as a repeat offender.
- At most max(1, floor(endpoints * max_ejected_percent / 100)) endpoints are ejected at once,
  and none when the percentage is 0: passive detection must never empty an upstream on a bad
  minute of the network.  An endpoint that hits its streak while the cap is full stays in
  rotation with its streak intact, so its next failure ejects it once there is room.
- An ejected endpoint stays ejected until `readmit_due` readmits it, even past its time: the
  count against the cap and the admin view change in one place only.

Pure: time is passed in; the caller sets a timer for `next_readmission()`.
"""

from __future__ import annotations

from typing import final

from gateway.config.model import OutlierDetectionConfig


@final
class _Endpoint:
    __slots__ = ("admitted_at", "ejected_until", "ejections", "failures")

    def __init__(self) -> None:
        #: consecutive failures since the last success or readmission
        self.failures = 0
        #: n of its latest ejection (before decay, which is applied at the next ejection)
        self.ejections = 0
        self.ejected_until: float | None = None
        #: when it was last readmitted; meaningless while `ejections` is 0
        self.admitted_at = 0.0


@final
class Outliers:
    __slots__ = ("_config", "_ejected", "_endpoints", "_max_ejected")

    def __init__(self, config: OutlierDetectionConfig, count: int) -> None:
        self._config = config
        self._endpoints = [_Endpoint() for _ in range(count)]
        percent = config.max_ejected_percent
        # integer arithmetic: 3 * 33 / 100 must not round differently on another machine
        self._max_ejected = 0 if percent <= 0 else max(1, count * percent // 100)
        self._ejected = 0

    def record(self, index: int, failure: bool, now: float) -> bool:
        """One request's outcome on endpoint `index` at `now`; True when this call ejected it."""
        endpoint = self._endpoints[index]
        if endpoint.ejected_until is not None:
            return False
        if not failure:
            endpoint.failures = 0
            return False
        endpoint.failures += 1
        config = self._config
        if endpoint.failures < config.consecutive_failures or self._ejected >= self._max_ejected:
            return False
        n = endpoint.ejections
        if n and config.ejection > 0:
            n = max(0, n - int((now - endpoint.admitted_at) // config.ejection))
        n += 1
        endpoint.ejections = n
        endpoint.ejected_until = now + min(config.max_ejection, config.ejection * n)
        endpoint.failures = 0
        self._ejected += 1
        return True

    def readmit_due(self, now: float) -> list[int]:
        """Readmit the endpoints whose ejection ended by `now`; their indices, in order."""
        readmitted: list[int] = []
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
        """The earliest end of an ejection, for the caller's timer; None when none is ejected."""
        earliest: float | None = None
        for endpoint in self._endpoints:
            until = endpoint.ejected_until
            if until is not None and (earliest is None or until < earliest):
                earliest = until
        return earliest

    def is_ejected(self, index: int) -> bool:
        return self._endpoints[index].ejected_until is not None

    def ejected_until(self, index: int) -> float | None:
        return self._endpoints[index].ejected_until

    def ejections(self, index: int) -> int:
        """n of the endpoint's latest ejection (0 if never ejected), for the admin API."""
        return self._endpoints[index].ejections
