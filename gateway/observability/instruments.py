"""The metric families and their children: what the data plane updates on every request.

prometheus_client spends microseconds per update (locks, label dicts); the data plane records
several metrics per request, so here a child is a slotted object and an update is one attribute
add.  Callers resolve `family.labels(...)` once, at build time, and keep the child.  Everything
runs on one event loop thread, so nothing is locked.  Compiled with the rest of the hot path
(setup.py).

Invariants: a family's label names are fixed when it is declared; a histogram child stores
per-bucket (not cumulative) counts and its count is their total, so `observe` touches one slot
and cumulative counts exist only in the text format (exposition.py).

Exemplars (OpenMetrics): a histogram child keeps, per bucket, the latest observation of a
sampled trace — but `observe` knows nothing of them: the caller adds one with `exemplar` only
for a request whose spans are recorded, so every other request pays nothing for the feature.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Final, Generic, Literal, TypeVar, final

#: an exemplar (OpenMetrics): trace id and span id in lower-case hex, the observed value, and
#: when it was observed (Unix seconds) — a tuple, so a snapshot file holds it as a JSON list
Exemplar = tuple[str, str, float, float]

#: the clock every reported duration is measured with (histograms, the access log's
#: duration_ms): uvloop's loop.time() ticks in whole milliseconds, which would put a 300 µs
#: request at 0 or 1 ms.  Deadlines and timers stay on loop.time(), the clock loop timers use.
#: Final, so compiled callers read it from a C static rather than a module dict per call.
clock: Final[Callable[[], float]] = time.perf_counter

#: how a gauge's values from several workers add up on /metrics (exposition.py)
Merge = Literal["sum", "min", "max"]

_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_STANDARD_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)

#: request latencies of a proxy: sub-millisecond for a local hop up to long upstream calls
DEFAULT_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


def bounded_method(method: str) -> str:
    """The method as a label value: a standard one, else OTHER, so the label stays bounded."""
    return method if method in _STANDARD_METHODS else "OTHER"


# -- children: what the hot path touches ---------------------------------------------------------


@final
class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


@final
class GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


@final
class HistogramChild:
    __slots__ = ("_counts", "_run_count", "_run_index", "bounds", "exemplars", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        #: per-bucket counts (read through `counts`); the last slot is the +Inf bucket
        self._counts = [0] * (len(bounds) + 1)
        #: observations in bucket `_run_index` not yet added to `_counts`: consecutive values
        #: mostly land in one bucket, and compiled, this count is a machine integer where a
        #: list item is an int object made anew at each increment (~200 instructions, callgrind)
        self._run_index = 0
        self._run_count = 0
        self.sum = 0.0
        #: per bucket, its latest exemplar; None until the first one (most children never get
        #: any, and a list per child would be bytes per route for nothing)
        self.exemplars: list[Exemplar | None] | None = None

    def observe(self, value: float) -> None:
        # a value equal to a bound belongs to that bucket (le = "less or equal").  A linear scan
        # beats bisect here: latencies land in the first few of ~15 buckets, and compiled it is
        # a few float compares instead of a call into the bisect module
        index = 0
        for bound in self.bounds:
            if value <= bound:
                break
            index += 1
        if index != self._run_index:
            self._counts[self._run_index] += self._run_count
            self._run_index = index
            self._run_count = 0
        self._run_count += 1
        self.sum += value

    @property
    def counts(self) -> list[int]:
        """Per-bucket counts, the last one the +Inf bucket."""
        if self._run_count:
            self._counts[self._run_index] += self._run_count
            self._run_count = 0
        return self._counts

    def exemplar(self, value: float, trace_id: str, span_id: str) -> None:
        """Make (`value`, `trace_id`, `span_id`, now) the exemplar of the bucket `value` falls in.

        Called after `observe(value)`, and only for a sampled request, so the bucket is found
        twice for those (a few compares) and `observe` stays what every other request runs."""
        index = 0
        for bound in self.bounds:
            if value <= bound:
                break
            index += 1
        exemplars = self.exemplars
        if exemplars is None:
            exemplars = self.exemplars = [None] * len(self.counts)
        exemplars[index] = (trace_id, span_id, value, time.time())


_Child = TypeVar("_Child", CounterChild, GaugeChild, HistogramChild)


# -- families --------------------------------------------------------------------------------


class _Family(Generic[_Child]):
    kind: str = ""

    def __init__(self, name: str, help: str, labels: Sequence[str]) -> None:
        if not _NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labels:
            if not _LABEL.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"invalid label name {label!r} for {name}")
        self.name = name
        self.help = help
        self.label_names: tuple[str, ...] = tuple(labels)
        self.children: dict[tuple[str, ...], _Child] = {}
        #: the one child of a family without labels, so it can be updated directly
        self._only: _Child | None = None if self.label_names else self.labels()

    def _new(self) -> _Child:
        raise NotImplementedError

    def labels(self, *values: str) -> _Child:
        """The child for these label values (created once, then cached)."""
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.label_names):
                raise ValueError(f"{self.name} takes labels {self.label_names}, got {values!r}")
            child = self._new()
            self.children[values] = child
        return child

    def remove(self, *values: str) -> None:
        """Drop a child: it is no longer rendered (a cached reference keeps counting unseen)."""
        self.children.pop(values, None)

    def _unlabelled(self) -> TypeError:
        return TypeError(f"{self.name} has labels {self.label_names}: use .labels(...)")


@final
class Counter(_Family[CounterChild]):
    kind = "counter"

    def _new(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1) -> None:
        child = self._only
        if child is None:
            raise self._unlabelled()
        child.value += amount

    def set_total(self, value: float) -> None:
        """Mirror a total that something else counts (the kernel's CPU time of this process)."""
        child = self._only
        if child is None:
            raise self._unlabelled()
        child.value = value


@final
class Gauge(_Family[GaugeChild]):
    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Sequence[str], merge: Merge = "sum") -> None:
        super().__init__(name, help, labels)
        self.merge: Merge = merge

    def _new(self) -> GaugeChild:
        return GaugeChild()

    def inc(self, amount: float = 1) -> None:
        child = self._only
        if child is None:
            raise self._unlabelled()
        child.value += amount

    def dec(self, amount: float = 1) -> None:
        child = self._only
        if child is None:
            raise self._unlabelled()
        child.value -= amount

    def set(self, value: float) -> None:
        child = self._only
        if child is None:
            raise self._unlabelled()
        child.value = value

    def set_info(self, *values: str) -> None:
        """Info style: exactly one child, these label values, at 1 (the old one is removed)."""
        self.children.clear()
        self.labels(*values).set(1)


@final
class Histogram(_Family[HistogramChild]):
    kind = "histogram"

    def __init__(
        self, name: str, help: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        bounds = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct finite numbers")
        # set before super().__init__, which creates the only child of an unlabelled family
        self.bounds = bounds
        super().__init__(name, help, labels)

    def _new(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def observe(self, value: float) -> None:
        child = self._only
        if child is None:
            raise self._unlabelled()
        child.observe(value)


AnyFamily = Counter | Gauge | Histogram
