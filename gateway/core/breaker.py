"""The circuit breaker (SPEC §5.4) as a pure state machine: time passed in, no timers, no I/O.

The caller classifies outcomes (failure or not) and passes the clock; this module only decides.

Invariants:
- `TRANSITIONS` is the one list of what may happen; every change of state goes through
  `_transition`, which raises on a (state, event) pair the table does not name.
- closed: everything is admitted.  Outcomes go into a sliding window of `BUCKETS` time buckets
  with running sums, so recording is O(1) amortised and nothing keeps per-request timestamps.
  Once the window holds `min_requests` outcomes and the share of failures (or, with `slow_call`,
  of slow calls) reaches its ratio, the breaker trips.
- open: everything is refused until the open period ends: `open_for` doubled per consecutive
  trip, capped at `max_open_for`, times a jitter factor in [0.9, 1.1) so that workers and
  gateways do not all probe in step.  The end is noticed lazily, by `allow` or `state_at`.
- half-open: at most `half_open_requests` probes are admitted in the period (a released probe
  gives its slot back).  A failed or slow probe opens the breaker again for a doubled period; all
  probes succeeding closes it with an empty window and the trip count reset.
- Every transition bumps a generation, and a ticket is the generation it was admitted in.  An
  outcome or release carrying an older ticket is ignored: a slow request admitted while closed
  or a probe of an earlier half-open period says nothing about the upstream as it is now.
- Each admitted ticket must be resolved exactly once, by `record` or by `release`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, Final, Protocol, final


class SlowCallPolicy(Protocol):
    @property
    def duration(self) -> float: ...
    @property
    def ratio(self) -> float: ...


class BreakerPolicy(Protocol):
    """What the breaker reads of its config (the circuit_breaker stage's CircuitBreakerConfig)."""

    @property
    def window(self) -> float: ...
    @property
    def min_requests(self) -> int: ...
    @property
    def failure_ratio(self) -> float: ...
    @property
    def slow_call(self) -> SlowCallPolicy | None: ...
    @property
    def open_for(self) -> float: ...
    @property
    def max_open_for(self) -> float: ...
    @property
    def half_open_requests(self) -> int: ...


# the states are also the values of the gateway_circuit_breaker_state gauge
CLOSED: Final = 0
OPEN: Final = 1
HALF_OPEN: Final = 2
STATE_NAMES: Final[dict[int, str]] = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}

TRIP: Final = "trip"
OPEN_ELAPSED: Final = "open_elapsed"
PROBE_FAILED: Final = "probe_failed"
PROBES_SUCCEEDED: Final = "probes_succeeded"

#: (state, event) -> the next state; a pair not listed here is a bug
TRANSITIONS: Final[dict[tuple[int, str], int]] = {
    (CLOSED, TRIP): OPEN,
    (OPEN, OPEN_ELAPSED): HALF_OPEN,
    (HALF_OPEN, PROBE_FAILED): OPEN,
    (HALF_OPEN, PROBES_SUCCEEDED): CLOSED,
}

#: the window is kept as this many buckets of window/BUCKETS seconds each
BUCKETS: Final = 10
#: what `allow` returns for a refused request (tickets are generations, never negative)
REJECTED: Final = -1


@final
class Breaker:
    __slots__ = (
        "_bucket_failures",
        "_bucket_slow",
        "_bucket_total",
        "_bucket_width",
        "_failure_ratio",
        "_generation",
        "_half_open_requests",
        "_max_open_for",
        "_min_requests",
        "_newest_slot",
        "_open_base",
        "_open_for",
        "_open_until",
        "_probes_admitted",
        "_probes_succeeded",
        "_rng",
        "_slow_duration",
        "_slow_ratio",
        "_sum_failures",
        "_sum_slow",
        "_sum_total",
        "config",
        "on_transition",
        "state",
        "trips",
    )

    def __init__(
        self,
        config: BreakerPolicy,
        now: float,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        # copied out of the config (an uncompiled dataclass): read on every outcome
        self._min_requests = config.min_requests
        self._failure_ratio = config.failure_ratio
        self._half_open_requests = config.half_open_requests
        self._open_for = config.open_for
        self._max_open_for = config.max_open_for
        slow = config.slow_call
        # without slow_call, infinity: no call is slow, so the slow share never trips
        self._slow_duration = slow.duration if slow is not None else math.inf
        self._slow_ratio = slow.ratio if slow is not None else math.inf
        self._rng = rng
        #: the state as of the last call; `state_at(now)` also applies the lazy open -> half-open
        self.state = CLOSED
        #: consecutive trips without closing in between
        self.trips = 0
        #: called with (from_state, to_state) after every transition
        self.on_transition: Callable[[int, int], None] | None = None
        self._generation = 0
        # the un-jittered open period of the last trip, doubled per trip rather than computed
        # as 2**trips, which would overflow a float after ~1000 trips of a long outage
        self._open_base = 0.0
        self._open_until = 0.0
        self._probes_admitted = 0
        self._probes_succeeded = 0
        self._bucket_width = config.window / BUCKETS
        self._bucket_total = [0] * BUCKETS
        self._bucket_failures = [0] * BUCKETS
        self._bucket_slow = [0] * BUCKETS
        # the newest slot (floor(time / width)) counted; the window is it and the BUCKETS-1
        # before it, slot s living in bucket s % BUCKETS
        self._newest_slot = math.floor(now / self._bucket_width)
        self._sum_total = 0
        self._sum_failures = 0
        self._sum_slow = 0

    # -- transitions -------------------------------------------------------------------------

    def _transition(self, event: str, now: float) -> None:
        before = self.state
        after = TRANSITIONS.get((before, event))
        if after is None:
            raise AssertionError(f"no transition for {STATE_NAMES[before]} on {event}")
        self.state = after
        # outstanding tickets now belong to the past
        self._generation += 1
        if after == OPEN:
            self.trips += 1
            if self.trips == 1:
                self._open_base = min(self._open_for, self._max_open_for)
            else:
                self._open_base = min(self._open_base * 2.0, self._max_open_for)
            self._open_until = now + self._open_base * (0.9 + 0.2 * self._rng())
        elif after == HALF_OPEN:
            self._probes_admitted = 0
            self._probes_succeeded = 0
        else:
            # closed after a good half-open period: the old failures are history
            self.trips = 0
            self._clear_window()
        callback = self.on_transition
        if callback is not None:
            callback(before, after)

    def state_at(self, now: float) -> int:
        """The state at `now`, moving open -> half-open if the open period is over."""
        if self.state == OPEN and now >= self._open_until:
            self._transition(OPEN_ELAPSED, now)
        return self.state

    # -- the caller's side -------------------------------------------------------------------

    def allow(self, now: float) -> int:
        """A ticket (>= 0) for a request admitted at `now`, or REJECTED."""
        state = self.state_at(now)
        if state == CLOSED:
            return self._generation
        if state == HALF_OPEN and self._probes_admitted < self._half_open_requests:
            self._probes_admitted += 1
            return self._generation
        return REJECTED

    def record(self, ticket: int, now: float, *, failure: bool, duration: float) -> None:
        """The outcome of the request admitted with `ticket`, which took `duration` seconds."""
        if ticket != self._generation:
            return  # admitted before the last transition (or REJECTED): stale news
        # a current ticket means no transition since it was issued: closed or half-open
        if self.state == CLOSED:
            self._count(now, failure, duration)
            if self._should_trip():
                self._transition(TRIP, now)
        elif failure or duration >= self._slow_duration:
            # a probe that is slow counts as failed: slow_call failures are failures too
            self._transition(PROBE_FAILED, now)
        else:
            self._probes_succeeded += 1
            if self._probes_succeeded >= self._half_open_requests:
                self._transition(PROBES_SUCCEEDED, now)

    def release(self, ticket: int) -> None:
        """The request admitted with `ticket` ended with no outcome: give back its probe slot."""
        if ticket == self._generation and self.state == HALF_OPEN and self._probes_admitted > 0:
            self._probes_admitted -= 1

    def retry_after(self, now: float) -> float:
        """Seconds until probes are admitted again; 0 unless open."""
        if self.state_at(now) != OPEN:
            return 0.0
        return self._open_until - now

    # -- the sliding window ------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        """Move the window to `now`: the buckets it has left leave the sums, emptied for reuse."""
        slot = math.floor(now / self._bucket_width)
        newest = self._newest_slot
        if slot <= newest:
            return  # the same bucket, or a clock that stepped back: count into the newest
        # at most BUCKETS buckets to empty, however long the gap
        for passed in range(max(newest + 1, slot - BUCKETS + 1), slot + 1):
            i = passed % BUCKETS
            self._sum_total -= self._bucket_total[i]
            self._sum_failures -= self._bucket_failures[i]
            self._sum_slow -= self._bucket_slow[i]
            self._bucket_total[i] = 0
            self._bucket_failures[i] = 0
            self._bucket_slow[i] = 0
        self._newest_slot = slot

    def _count(self, now: float, failure: bool, duration: float) -> None:
        self._advance(now)
        i = self._newest_slot % BUCKETS
        self._bucket_total[i] += 1
        self._sum_total += 1
        if failure:
            self._bucket_failures[i] += 1
            self._sum_failures += 1
        if duration >= self._slow_duration:
            self._bucket_slow[i] += 1
            self._sum_slow += 1

    def _should_trip(self) -> bool:
        total = self._sum_total
        if total < self._min_requests:
            return False
        # divide rather than compare with ratio * total: 7 of 50 must reach 0.14, and
        # 0.14 * 50 rounds to just above 7
        return (
            self._sum_failures / total >= self._failure_ratio
            or self._sum_slow / total >= self._slow_ratio
        )

    def _clear_window(self) -> None:
        for i in range(BUCKETS):
            self._bucket_total[i] = 0
            self._bucket_failures[i] = 0
            self._bucket_slow[i] = 0
        self._sum_total = 0
        self._sum_failures = 0
        self._sum_slow = 0

    # -- the admin API -----------------------------------------------------------------------

    def describe(self, now: float) -> dict[str, Any]:
        """The breaker for /admin/upstreams: state, window counts, open time left, trips."""
        state = self.state_at(now)
        self._advance(now)
        return {
            "state": STATE_NAMES[state],
            "window": {
                "requests": self._sum_total,
                "failures": self._sum_failures,
                "slow": self._sum_slow,
            },
            "open_remaining": self._open_until - now if state == OPEN else None,
            "consecutive_trips": self.trips,
        }
