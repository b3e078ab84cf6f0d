"""The circuit breaker as a pure state machine: time passed in, no timers, no I/O.

States and the events that move between them are listed once, in `TRANSITIONS`; every change
of state goes through `_transition`, which refuses a pair the table does not name.

- closed: everything is admitted; outcomes go into a sliding window of `BUCKETS` time buckets
  with running sums (O(1) per outcome; a bucket leaves the sums as time moves past it).  Once
  the window holds `min_requests` outcomes and the share of failures (or, with `slow_call`, of
  slow calls) reaches its ratio, the breaker trips.
- open: everything is refused until the open period ends: `open_for` * 2^(trips - 1), capped at
  `max_open_for`, times a jitter factor in [0.9, 1.1] so that many gateways do not probe in
  step.  The period's end is noticed lazily, on the next `allow` or `state_at`.
- half-open: `half_open_requests` probes are admitted, no more.  Any probe failing opens the
  breaker again (for a doubled period); all of them succeeding closes it and forgets the trips.

Each admitted request gets a ticket naming the breaker's generation (bumped on every
transition).  An outcome whose ticket is from an earlier generation — a slow request admitted
before the breaker opened, a probe of an earlier half-open period — is ignored: it says nothing
about the upstream as it is now.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, Final, final

from gateway.config.model import CircuitBreakerConfig

CLOSED: Final = 0
OPEN: Final = 1
HALF_OPEN: Final = 2
STATE_NAMES: Final = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}

TRIP: Final = "trip"
OPEN_ELAPSED: Final = "open_elapsed"
PROBE_FAILED: Final = "probe_failed"
PROBES_SUCCEEDED: Final = "probes_succeeded"

#: (state, event) -> the next state; nothing else may happen
TRANSITIONS: Final[dict[tuple[int, str], int]] = {
    (CLOSED, TRIP): OPEN,
    (OPEN, OPEN_ELAPSED): HALF_OPEN,
    (HALF_OPEN, PROBE_FAILED): OPEN,
    (HALF_OPEN, PROBES_SUCCEEDED): CLOSED,
}

#: the window is kept as this many buckets of window/BUCKETS seconds each
BUCKETS: Final = 10
#: a rejected request's ticket
REJECTED: Final = -1


@final
class Breaker:
    __slots__ = (
        "_failure_ratio",
        "_failures",
        "_generation",
        "_half_open_requests",
        "_latest",
        "_min_requests",
        "_open_until",
        "_probes_admitted",
        "_probes_succeeded",
        "_rng",
        "_slot_width",
        "_slow",
        "_slow_duration",
        "_slow_ratio",
        "_sum_failures",
        "_sum_slow",
        "_sum_total",
        "_totals",
        "config",
        "on_transition",
        "state",
        "trips",
    )

    def __init__(
        self,
        config: CircuitBreakerConfig,
        now: float,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        # copied out of the (uncompiled) config: read on every outcome
        self._min_requests = config.min_requests
        self._failure_ratio = config.failure_ratio
        self._half_open_requests = config.half_open_requests
        slow = config.slow_call
        #: a duration no call reaches when slow calls are not counted
        self._slow_duration = slow.duration if slow is not None else math.inf
        self._slow_ratio = slow.ratio if slow is not None else math.inf
        self._rng = rng
        self.state = CLOSED
        #: consecutive trips without closing in between (the open period doubles with each)
        self.trips = 0
        self._generation = 0
        self._open_until = 0.0
        self._probes_admitted = 0
        self._probes_succeeded = 0
        self._slot_width = config.window / BUCKETS
        self._totals = [0] * BUCKETS
        self._failures = [0] * BUCKETS
        self._slow = [0] * BUCKETS
        #: the newest slot number (time // width) counted; the window is it and the 9 before
        self._latest = math.floor(now / self._slot_width)
        self._sum_total = self._sum_failures = self._sum_slow = 0
        #: called with (from, to) on every transition
        self.on_transition: Callable[[int, int], None] | None = None

    # -- the transition table's one door -----------------------------------------------------

    def _transition(self, event: str, now: float) -> None:
        before = self.state
        after = TRANSITIONS.get((before, event))
        if after is None:
            raise AssertionError(f"no transition for {STATE_NAMES[before]} on {event}")
        self.state = after
        self._generation += 1
        if after == OPEN:
            self.trips += 1
            self._open_until = now + self._open_period()
        elif after == HALF_OPEN:
            self._probes_admitted = 0
            self._probes_succeeded = 0
        else:  # closed again: start from a clean slate
            self.trips = 0
            self._clear_window()
        callback = self.on_transition
        if callback is not None:
            callback(before, after)

    def _open_period(self) -> float:
        config = self.config
        base = min(config.max_open_for, config.open_for * 2.0 ** (self.trips - 1))
        return base * (0.9 + 0.2 * self._rng())

    # -- asking and telling ------------------------------------------------------------------

    def state_at(self, now: float) -> int:
        if self.state == OPEN and now >= self._open_until:
            self._transition(OPEN_ELAPSED, now)
        return self.state

    def allow(self, now: float) -> int:
        """A ticket for a request admitted now, or REJECTED."""
        state = self.state_at(now)
        if state == CLOSED:
            return self._generation
        if state == HALF_OPEN and self._probes_admitted < self._half_open_requests:
            self._probes_admitted += 1
            return self._generation
        return REJECTED

    def record(self, ticket: int, now: float, *, failure: bool, duration: float) -> None:
        """The outcome of the request `ticket` admitted."""
        if ticket != self._generation:
            return  # admitted under an earlier state: stale news
        state = self.state
        if state == CLOSED:
            self._count(now, failure, duration)
            if self._should_trip():
                self._transition(TRIP, now)
        elif state == HALF_OPEN:
            if failure or self._is_slow(duration):
                self._transition(PROBE_FAILED, now)
            else:
                self._probes_succeeded += 1
                if self._probes_succeeded >= self._half_open_requests:
                    self._transition(PROBES_SUCCEEDED, now)

    def release(self, ticket: int) -> None:
        """The request `ticket` admitted ended without an outcome: free its probe slot."""
        if ticket == self._generation and self.state == HALF_OPEN and self._probes_admitted:
            self._probes_admitted -= 1

    def retry_after(self, now: float) -> float:
        """Seconds until probes are admitted again (0 unless open)."""
        return max(0.0, self._open_until - now) if self.state_at(now) == OPEN else 0.0

    # -- the sliding window ------------------------------------------------------------------

    def _is_slow(self, duration: float) -> bool:
        return duration >= self._slow_duration

    def _advance(self, now: float) -> None:
        """Move the window to `now`: buckets it has passed leave the sums, emptied for reuse."""
        slot = math.floor(now / self._slot_width)
        latest = self._latest
        if slot <= latest:
            return  # the same bucket (or a clock that stepped back: count it in the newest)
        for passed in range(max(latest + 1, slot - BUCKETS + 1), slot + 1):
            i = passed % BUCKETS
            self._sum_total -= self._totals[i]
            self._sum_failures -= self._failures[i]
            self._sum_slow -= self._slow[i]
            self._totals[i] = self._failures[i] = self._slow[i] = 0
        self._latest = slot

    def _count(self, now: float, failure: bool, duration: float) -> None:
        self._advance(now)
        i = self._latest % BUCKETS
        self._totals[i] += 1
        self._sum_total += 1
        if failure:
            self._failures[i] += 1
            self._sum_failures += 1
        if self._is_slow(duration):
            self._slow[i] += 1
            self._sum_slow += 1

    def _window(self, now: float) -> tuple[int, int, int]:
        """(total, failures, slow) over the buckets still inside the window at `now`."""
        self._advance(now)
        return self._sum_total, self._sum_failures, self._sum_slow

    def _should_trip(self) -> bool:
        total = self._sum_total
        if total < self._min_requests:
            return False
        return (
            self._sum_failures >= self._failure_ratio * total
            or self._sum_slow >= self._slow_ratio * total
        )

    def _clear_window(self) -> None:
        for i in range(BUCKETS):
            self._totals[i] = self._failures[i] = self._slow[i] = 0
        self._sum_total = self._sum_failures = self._sum_slow = 0

    def describe(self, now: float) -> dict[str, Any]:
        state = self.state_at(now)
        total, failures, slow = self._window(now)
        return {
            "state": STATE_NAMES[state],
            "window": {"requests": total, "failures": failures, "slow": slow},
            "open_remaining": self.retry_after(now) if state == OPEN else None,
            "consecutive_trips": self.trips,
        }
