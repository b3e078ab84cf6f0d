"""The circuit breaker as a pure state machine: time passed in, no timers, no I/O.

States and the events that move between them are listed once, in `TRANSITIONS`; every change
of state goes through `_transition`, which refuses a pair the table does not name.

- closed: everything is admitted; outcomes go into a sliding window of `BUCKETS` time buckets
  (counts only, O(1) per outcome).  Once the window holds `min_requests` outcomes and the share
  of failures (or, with `slow_call`, of slow calls) reaches its ratio, the breaker trips.
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
        "_failures",
        "_generation",
        "_open_until",
        "_probes_admitted",
        "_probes_succeeded",
        "_rng",
        "_slot_width",
        "_slots",
        "_slow",
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
        #: the absolute slot number (time // width) each bucket currently counts
        self._slots = [math.floor(now / self._slot_width)] * BUCKETS
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
        if state == HALF_OPEN and self._probes_admitted < self.config.half_open_requests:
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
            if self._should_trip(now):
                self._transition(TRIP, now)
        elif state == HALF_OPEN:
            if failure or self._is_slow(duration):
                self._transition(PROBE_FAILED, now)
            else:
                self._probes_succeeded += 1
                if self._probes_succeeded >= self.config.half_open_requests:
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
        slow = self.config.slow_call
        return slow is not None and duration >= slow.duration

    def _count(self, now: float, failure: bool, duration: float) -> None:
        slot = math.floor(now / self._slot_width)
        i = slot % BUCKETS
        if self._slots[i] != slot:
            # this bucket last held an older slot: its counts have left the window
            self._slots[i] = slot
            self._totals[i] = self._failures[i] = self._slow[i] = 0
        self._totals[i] += 1
        if failure:
            self._failures[i] += 1
        if self._is_slow(duration):
            self._slow[i] += 1

    def _window(self, now: float) -> tuple[int, int, int]:
        """(total, failures, slow) over the buckets still inside the window at `now`."""
        oldest = math.floor(now / self._slot_width) - BUCKETS + 1
        total = failures = slow = 0
        for i in range(BUCKETS):
            if self._slots[i] >= oldest:
                total += self._totals[i]
                failures += self._failures[i]
                slow += self._slow[i]
        return total, failures, slow

    def _should_trip(self, now: float) -> bool:
        config = self.config
        total, failures, slow = self._window(now)
        if total < config.min_requests:
            return False
        if failures >= config.failure_ratio * total:
            return True
        return config.slow_call is not None and slow >= config.slow_call.ratio * total

    def _clear_window(self) -> None:
        for i in range(BUCKETS):
            self._totals[i] = self._failures[i] = self._slow[i] = 0

    def describe(self, now: float) -> dict[str, Any]:
        state = self.state_at(now)
        total, failures, slow = self._window(now)
        return {
            "state": STATE_NAMES[state],
            "window": {"requests": total, "failures": failures, "slow": slow},
            "open_remaining": self.retry_after(now) if state == OPEN else None,
            "consecutive_trips": self.trips,
        }
