"""Our own lean metrics registry, rendered in the Prometheus text format 0.0.4.

prometheus_client spends microseconds per update (locks, label dicts); the data plane records
several metrics per request, so here a child is a slotted object and an update is one attribute
add.  Callers resolve `family.labels(...)` once, at build time, and keep the child.  Everything
runs on one event loop thread, so nothing is locked.

Invariants: a family's label names are fixed when it is declared; a histogram child stores
per-bucket (not cumulative) counts and its count is their total, so `observe` touches one slot
and cumulative counts exist only in `render`.  With several workers each one publishes
`snapshot()` to a file and the worker serving /metrics renders its live values merged with the
others' snapshots: counters and histograms add, gauges follow their family's `merge` mode.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any, Final, Generic, Literal, TypeVar, final

Merge = Literal["sum", "min", "max"]
Snapshot = dict[str, Any]

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
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        #: per-bucket counts; the last slot is the +Inf bucket
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # a value equal to a bound belongs to that bucket (le = "less or equal").  A linear scan
        # beats bisect here: latencies land in the first few of ~15 buckets, and compiled it is
        # a few float compares instead of a call into the bisect module
        index = 0
        for bound in self.bounds:
            if value <= bound:
                break
            index += 1
        self.counts[index] += 1
        self.sum += value


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


# -- text format -----------------------------------------------------------------------------


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    value = float(value)  # set(1) stores an int, and int has no is_integer() before 3.12
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _label_text(names: Sequence[str], values: Sequence[str], le: str | None = None) -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if le is not None:
        parts.append(f'le="{le}"')
    return "{" + ",".join(parts) + "}" if parts else ""


def _render_family(family: AnyFamily, others: list[Any], out: list[str]) -> None:
    name = family.name
    out.append(f"# HELP {name} {_escape_help(family.help)}")
    out.append(f"# TYPE {name} {family.kind}")
    names = family.label_names
    if isinstance(family, Histogram):
        # le values as floats ("1.0"), the form Prometheus normalizes them to
        les = [repr(b) for b in family.bounds] + ["+Inf"]
        for key, (counts, total) in _merge_histograms(family, others).items():
            cumulative = 0
            for le, count in zip(les, counts, strict=True):
                cumulative += count
                out.append(f"{name}_bucket{_label_text(names, key, le)} {cumulative}")
            labels = _label_text(names, key)
            out.append(f"{name}_sum{labels} {_number(total)}")
            out.append(f"{name}_count{labels} {cumulative}")
        return
    merge: Merge = family.merge if isinstance(family, Gauge) else "sum"
    for key, value in _merge_values(family, others, merge).items():
        out.append(f"{name}{_label_text(names, key)} {_number(value)}")


# -- multi-worker merge ----------------------------------------------------------------------
# Other workers' snapshots come from files: every row is checked and a malformed one skipped,
# so a bad file can cost some numbers but never the whole /metrics answer.


def _key(labels: Any, width: int) -> tuple[str, ...] | None:
    if (
        isinstance(labels, list)
        and len(labels) == width
        and all(isinstance(v, str) for v in labels)
    ):
        return tuple(labels)
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _merge_values(
    family: Counter | Gauge, others: list[Any], merge: Merge
) -> dict[tuple[str, ...], float]:
    values = {k: c.value for k, c in family.children.items()}
    width = len(family.label_names)
    for rows in others:
        if not isinstance(rows, list):
            continue
        for row in rows:
            if not isinstance(row, list) or len(row) != 2 or not _is_number(row[1]):
                continue
            key = _key(row[0], width)
            if key is None:
                continue
            value = float(row[1])
            mine = values.get(key)
            if mine is None:
                values[key] = value
            elif merge == "min":
                values[key] = min(mine, value)
            elif merge == "max":
                values[key] = max(mine, value)
            else:
                values[key] = mine + value
    return values


def _merge_histograms(
    family: Histogram, others: list[Any]
) -> dict[tuple[str, ...], tuple[list[int], float]]:
    merged = {k: (list(c.counts), c.sum) for k, c in family.children.items()}
    width = len(family.label_names)
    slots = len(family.bounds) + 1
    for rows in others:
        if not isinstance(rows, list):
            continue
        for row in rows:
            if not isinstance(row, list) or len(row) != 3 or not _is_number(row[2]):
                continue
            key, counts = _key(row[0], width), row[1]
            if (
                key is None
                or not isinstance(counts, list)
                or len(counts) != slots
                or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts)
            ):
                continue
            mine = merged.get(key)
            if mine is None:
                merged[key] = (list(counts), float(row[2]))
            else:
                summed = [a + b for a, b in zip(mine[0], counts, strict=True)]
                merged[key] = (summed, mine[1] + float(row[2]))
    return merged


def _family_snapshot(family: AnyFamily) -> list[list[Any]]:
    if isinstance(family, Histogram):
        return [[list(k), list(c.counts), c.sum] for k, c in family.children.items()]
    return [[list(k), c.value] for k, c in family.children.items()]


# -- registry --------------------------------------------------------------------------------


class Registry:
    """Every metric family of one process, in declaration order."""

    def __init__(self) -> None:
        self.families: dict[str, AnyFamily] = {}

    def _add(self, family: AnyFamily) -> None:
        if family.name in self.families:
            raise ValueError(f"metric {family.name} declared twice")
        self.families[family.name] = family

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        """A counter; its name gets the conventional `_total` suffix if it lacks one."""
        family = Counter(name if name.endswith("_total") else f"{name}_total", help, labels)
        self._add(family)
        return family

    def gauge(
        self, name: str, help: str, labels: Sequence[str] = (), merge: Merge = "sum"
    ) -> Gauge:
        family = Gauge(name, help, labels, merge)
        self._add(family)
        return family

    def histogram(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        family = Histogram(name, help, labels, buckets)
        self._add(family)
        return family

    def snapshot(self) -> Snapshot:
        """The live values as plain JSON data: {family name: rows}."""
        return {name: _family_snapshot(f) for name, f in self.families.items()}

    def write_snapshot(self, path: str) -> None:
        """Replace `path` atomically (temp file + os.replace): readers never see half a file."""
        directory = os.path.dirname(path) or "."
        # the temporary name does not end in .json, so read_snapshots never picks it up
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".metrics-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(self.snapshot(), out, separators=(",", ":"))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

    def render(self, extra: Iterable[object] = ()) -> str:
        """Prometheus text of the live values merged with other workers' snapshots (anything
        that is not a snapshot, such as a file another worker was still writing, is skipped)."""
        others: list[Snapshot] = [s for s in extra if isinstance(s, dict)]
        out: list[str] = []
        for name, family in self.families.items():
            _render_family(family, [s.get(name) for s in others], out)
        out.append("")
        return "\n".join(out)


def read_snapshots(directory: str, exclude: str = "") -> list[Snapshot]:
    """The snapshots (`*.json`) in `directory` except the file named `exclude` (our own).

    Unreadable, partial or non-object files are skipped without raising: /metrics must answer
    even while a worker is dying or the directory is being cleaned up.
    """
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    result: list[Snapshot] = []
    for name in names:
        if name == exclude or not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            result.append(data)
    return result


# -- the gateway's metrics -------------------------------------------------------------------


class GatewayMetrics:
    """Every metric of SPEC §9 the gateway records, each declared once, here."""

    def __init__(self, registry: Registry) -> None:
        r = registry
        self.registry = registry
        self.requests_total = r.counter(
            "gateway_requests_total", "Requests answered.", ("route", "method", "code")
        )
        self.request_duration_seconds = r.histogram(
            "gateway_request_duration_seconds", "Request head to response end.", ("route",)
        )
        self.requests_in_flight = r.gauge("gateway_requests_in_flight", "Requests in progress.")
        self.connections_active = r.gauge(
            "gateway_connections_active", "Open client connections.", ("listener",)
        )
        self.connections_refused_total = r.counter(
            "gateway_connections_refused_total",
            "Client connections refused (answered 503 too_many_connections, or closed at once in"
            ' a flood): over limits.max_connections (reason "max_connections") or'
            ' limits.max_connections_per_client ("per_client").',
            ("listener", "reason"),
        )
        self.upstream_evictions_total = r.counter(
            "gateway_upstream_evictions_total",
            "Pooled upstream connections taken back from clients that had stopped reading their"
            " response while other requests waited for a connection.",
            ("upstream",),
        )
        self.slow_clients_total = r.counter(
            "gateway_slow_clients_total",
            "Connections cut for sending a request body (direction \"upload\") or reading a"
            ' response ("download") slower than limits.min_data_rate.',
            ("listener", "direction"),
        )
        self.upstream_request_duration_seconds = r.histogram(
            "gateway_upstream_request_duration_seconds",
            "Request sent upstream to response head received.",
            ("upstream",),
        )
        self.upstream_connect_duration_seconds = r.histogram(
            "gateway_upstream_connect_duration_seconds", "Upstream TCP connect.", ("upstream",)
        )
        self.upstream_tls_handshake_duration_seconds = r.histogram(
            "gateway_upstream_tls_handshake_duration_seconds",
            "Upstream TLS handshake, after the TCP connect.",
            ("upstream",),
        )
        self.upstream_connections_total = r.counter(
            "gateway_upstream_connections_total",
            "Upstream connections taken, by whether a pooled one was reused.",
            ("upstream", "reused"),
        )
        self.upstream_busy_total = r.counter(
            "gateway_upstream_busy_total",
            "Requests answered 503 upstream_busy: no pooled connection to the upstream freed"
            " within pool.queue_timeout (never sent).",
            ("upstream",),
        )
        self.upstream_attempts_total = r.counter(
            "gateway_upstream_attempts_total",
            "Exchanges with an endpoint, by result: a failure is a connect error, reset,"
            " timeout, invalid response, 502/503/504, or a response body cut short (judged when"
            " the body ends) — what outlier detection counts.",
            ("upstream", "endpoint", "result"),
        )
        # min over workers: each runs its own checks; one that cannot reach it says 0
        self.upstream_endpoint_up = r.gauge(
            "gateway_upstream_endpoint_up",
            "1 while an endpoint is healthy and not ejected.",
            ("upstream", "endpoint"),
            merge="min",
        )
        # max over workers: a breaker open in any worker shows
        self.circuit_breaker_state = r.gauge(
            "gateway_circuit_breaker_state",
            "Circuit state: 0 closed, 1 open, 2 half-open.",
            ("route", "upstream"),
            merge="max",
        )
        self.circuit_breaker_transitions_total = r.counter(
            "gateway_circuit_breaker_transitions_total",
            "Circuit state changes, by the state entered.",
            ("route", "upstream", "to"),
        )
        self.rate_limited_total = r.counter(
            "gateway_rate_limited_total", "Requests refused with 429.", ("route",)
        )
        self.rate_limit_store_errors_total = r.counter(
            "gateway_rate_limit_store_errors_total",
            "Rate-limit store failures (the request fell back or was refused).",
            ("route",),
        )
        self.idempotency_total = r.counter(
            "gateway_idempotency_total",
            "Requests with idempotency keys, by what became of them.",
            ("route", "outcome"),
        )
        # the route label is the stage's: a named middleware's records are one set
        self.idempotency_evictions_total = r.counter(
            "gateway_idempotency_evictions_total",
            "Completed idempotency records dropped before their ttl to stay within max_keys or"
            " max_bytes (a repeat of one runs again).",
            ("route",),
        )
        self.idempotency_records = r.gauge(
            "gateway_idempotency_records",
            "Idempotency records held in memory, in-flight locks included.",
            ("route",),
        )
        self.idempotency_records_bytes = r.gauge(
            "gateway_idempotency_records_bytes",
            "Bytes of idempotency records counted against max_bytes (keys, stored responses).",
            ("route",),
        )
        self.jwt_total = r.counter(
            "gateway_jwt_total", "Bearer tokens checked, by result.", ("route", "result")
        )
        # reasons are gateway.core.jwt_tokens.SkipReason, a fixed set
        self.jwt_keys_skipped_total = r.counter(
            "gateway_jwt_keys_skipped_total",
            "JWKS entries left out because they cannot verify tokens, each time a set is read.",
            ("reason",),
        )
        self.retries_total = r.counter(
            "gateway_retries_total", "Upstream attempts after the first.", ("route", "upstream")
        )
        self.retry_budget_exhausted_total = r.counter(
            "gateway_retry_budget_exhausted_total",
            "Retries not made because the upstream's retry budget was spent.",
            ("upstream",),
        )
        self.tls_certificate_not_after_seconds = r.gauge(
            "gateway_tls_certificate_not_after_seconds",
            "When each listener certificate expires (Unix time).",
            ("name",),
            merge="min",
        )
        self.config_reloads_total = r.counter(
            "gateway_config_reloads_total", "Configuration reloads by result.", ("result",)
        )
        # min over workers: one worker that rejected the reload makes the gateway's answer 0
        self.config_last_reload_success = r.gauge(
            "gateway_config_last_reload_success", "1 if the last reload succeeded.", merge="min"
        )
        self.config_last_reload_success.set(1)
        # max over workers = the union of versions in use, each at 1
        self.config_info = r.gauge(
            "gateway_config_info", "Configuration version in use.", ("version",), merge="max"
        )
