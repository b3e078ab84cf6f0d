"""Exposition: the registry of one process's metric families, the Prometheus text format 0.0.4
and OpenMetrics 1.0.0 text (which /metrics answers is the scraper's `Accept`: `wants_openmetrics`),
and /metrics across workers.

With several workers each one publishes `Registry.snapshot()` to a file (`write_snapshot`) and
the worker serving /metrics renders its live values merged with the others' snapshots
(`read_snapshots`): counters and histograms add, gauges follow their family's `merge` mode.
Nothing here runs per request: the data plane only touches the children (instruments.py).

OpenMetrics differs from the Prometheus text in what a scraper can check strictly: a counter
family is named without `_total` (its samples keep it), an info family (`Registry.info`) is of
type info, `"` is escaped in HELP too, exemplars follow histogram buckets, and `# EOF` ends it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

from gateway.observability.instruments import (
    DEFAULT_BUCKETS,
    AnyFamily,
    Counter,
    Exemplar,
    Gauge,
    Histogram,
    HistogramChild,
    Merge,
)

#: one worker's live values as plain JSON data, {family name: rows}: what it publishes to its file
MetricsSnapshot = dict[str, Any]

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
#: the OpenMetrics versions a scraper may ask for that our 1.0.0 text satisfies (0.0.1 is the
#: draft Prometheus still lists; its text is the same)
_OPENMETRICS_VERSIONS = frozenset({"1.0.0", "0.0.1"})
_TRACE_ID = re.compile(r"[0-9a-f]{32}\Z")
_SPAN_ID = re.compile(r"[0-9a-f]{16}\Z")


# -- content negotiation ---------------------------------------------------------------------


def _quality(text: str) -> float:
    try:
        q = float(text)
    except ValueError:
        return 0.0
    return q if 0.0 <= q <= 1.0 else 0.0  # NaN fails both compares


def wants_openmetrics(accept: str) -> bool:
    """Whether an `Accept` value prefers OpenMetrics text to the Prometheus text: an
    `application/openmetrics-text` range of a version we write, with a quality above 0 and not
    below the best that text/plain (or text/*, */*) gets.  No Accept, `*/*` or text/plain alone
    get the Prometheus text, as before OpenMetrics was offered."""
    openmetrics = 0.0
    text = 0.0
    for media_range in accept.split(","):
        params = media_range.split(";")
        media_type = params[0].strip().lower()
        q = 1.0
        version: str | None = None
        for param in params[1:]:
            name, _, value = param.partition("=")
            name = name.strip().lower()
            value = value.strip().strip('"')
            if name == "q":
                q = _quality(value)
            elif name == "version":
                version = value
        if media_type == "application/openmetrics-text":
            if version is None or version in _OPENMETRICS_VERSIONS:
                openmetrics = max(openmetrics, q)
        elif media_type in ("text/plain", "text/*", "*/*"):
            text = max(text, q)
    return openmetrics > 0.0 and openmetrics >= text


# -- text format -----------------------------------------------------------------------------


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_openmetrics_help(text: str) -> str:
    # OpenMetrics HELP is an escaped string like a label value: a bare `"` is invalid there
    return _escape_label(text)


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


def _render_samples(
    family: AnyFamily, others: list[Any], out: list[str], openmetrics: bool, info: bool
) -> None:
    """A family's sample lines, the same in both formats but for what only OpenMetrics has:
    exemplars after histogram buckets, and info samples (1 by definition)."""
    name = family.name
    names = family.label_names
    if isinstance(family, Histogram):
        # le values as floats ("1.0"), the form Prometheus normalizes them to
        les = [repr(b) for b in family.bounds] + ["+Inf"]
        exemplars = _merge_exemplars(family, others) if openmetrics else {}
        for key, (counts, total) in _merge_histograms(family, others).items():
            kept = exemplars.get(key)
            cumulative = 0
            for index, (le, count) in enumerate(zip(les, counts, strict=True)):
                cumulative += count
                sample = f"{name}_bucket{_label_text(names, key, le)} {cumulative}"
                if kept is not None:
                    sample += _exemplar_text(kept[index])
                out.append(sample)
            labels = _label_text(names, key)
            out.append(f"{name}_sum{labels} {_number(total)}")
            out.append(f"{name}_count{labels} {cumulative}")
        return
    merge: Merge = family.merge if isinstance(family, Gauge) else "sum"
    for key, value in _merge_values(family, others, merge).items():
        if info and value != 1:
            continue  # an info sample is 1 by definition: anything else is a broken snapshot
        out.append(f"{name}{_label_text(names, key)} {_number(value)}")


def _render_family(family: AnyFamily, others: list[Any], out: list[str]) -> None:
    out.append(f"# HELP {family.name} {_escape_help(family.help)}")
    out.append(f"# TYPE {family.name} {family.kind}")
    _render_samples(family, others, out, openmetrics=False, info=False)


def _exemplar_text(exemplar: Exemplar | None) -> str:
    if exemplar is None:
        return ""
    trace_id, span_id, value, at = exemplar
    return f' # {{trace_id="{trace_id}",span_id="{span_id}"}} {_number(value)} {at!r}'


def _render_openmetrics_family(
    family: AnyFamily, others: list[Any], info: bool, out: list[str]
) -> None:
    # a family is named without the suffix its samples carry (`_total`, `_info`)
    name = family.name
    if isinstance(family, Histogram):
        kind, base = "histogram", name
    elif isinstance(family, Counter):
        kind, base = "counter", name.removesuffix("_total")
    elif info:
        kind, base = "info", name.removesuffix("_info")
    else:
        kind, base = "gauge", name
    out.append(f"# HELP {base} {_escape_openmetrics_help(family.help)}")
    out.append(f"# TYPE {base} {kind}")
    _render_samples(family, others, out, openmetrics=True, info=info)


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
            # [labels, counts, sum] and, once the child has exemplars, a fourth item with them
            if not isinstance(row, list) or len(row) not in (3, 4) or not _is_number(row[2]):
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


def _exemplar_row(row: Any, low: float, high: float) -> Exemplar | None:
    """An exemplar from another worker's file, if it is one for the bucket (low, high]."""
    if not isinstance(row, list) or len(row) != 4:
        return None
    trace_id, span_id, value, at = row
    if (
        not isinstance(trace_id, str)
        or not isinstance(span_id, str)
        or not _TRACE_ID.match(trace_id)
        or not _SPAN_ID.match(span_id)
        or not _is_number(value)
        or not _is_number(at)
        or not low < value <= high
        or not math.isfinite(at)
    ):
        return None
    return (trace_id, span_id, float(value), float(at))


def _merge_exemplars(
    family: Histogram, others: list[Any]
) -> dict[tuple[str, ...], list[Exemplar | None]]:
    """Per child, per bucket, the latest exemplar of any worker (the most recent trace is the
    likeliest one the tracing backend still holds)."""
    merged: dict[tuple[str, ...], list[Exemplar | None]] = {}
    for k, c in family.children.items():
        if c.exemplars is not None:
            merged[k] = list(c.exemplars)
    width = len(family.label_names)
    edges = [-math.inf, *family.bounds, math.inf]
    slots = len(edges) - 1
    for rows in others:
        if not isinstance(rows, list):
            continue
        for row in rows:
            if not isinstance(row, list) or len(row) != 4 or not isinstance(row[3], list):
                continue
            key, theirs = _key(row[0], width), row[3]
            if key is None or len(theirs) != slots:
                continue
            mine = merged.setdefault(key, [None] * slots)
            for index in range(slots):
                exemplar = _exemplar_row(theirs[index], edges[index], edges[index + 1])
                if exemplar is None:
                    continue
                current = mine[index]
                if current is None or exemplar[3] > current[3]:
                    mine[index] = exemplar
    return merged


def _histogram_row(key: tuple[str, ...], child: HistogramChild) -> list[Any]:
    row: list[Any] = [list(key), list(child.counts), child.sum]
    exemplars = child.exemplars
    if exemplars is not None:
        row.append([None if e is None else list(e) for e in exemplars])
    return row


def _family_snapshot(family: AnyFamily) -> list[list[Any]]:
    if isinstance(family, Histogram):
        return [_histogram_row(k, c) for k, c in family.children.items()]
    return [[list(k), c.value] for k, c in family.children.items()]


# -- registry --------------------------------------------------------------------------------


class Registry:
    """Every metric family of one process, in declaration order."""

    def __init__(self) -> None:
        self.families: dict[str, AnyFamily] = {}
        #: the gauges declared with `info`: OpenMetrics types them info
        self.infos: set[str] = set()

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

    def info(self, name: str, help: str, labels: Sequence[str]) -> Gauge:
        """An info metric: a gauge whose children are at 1 (`Gauge.set_info`), the union over
        workers (merge max); the Prometheus text shows it as a gauge, OpenMetrics as an info
        family named without `_info`."""
        if not name.endswith("_info"):
            raise ValueError(f"info metric {name} must end in _info")
        family = self.gauge(name, help, labels, merge="max")
        self.infos.add(name)
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

    def snapshot(self) -> MetricsSnapshot:
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
        others: list[MetricsSnapshot] = [s for s in extra if isinstance(s, dict)]
        out: list[str] = []
        for name, family in self.families.items():
            _render_family(family, [s.get(name) for s in others], out)
        out.append("")
        return "\n".join(out)

    def render_openmetrics(self, extra: Iterable[object] = ()) -> str:
        """OpenMetrics 1.0.0 text of the same values as `render`, exemplars included."""
        others: list[MetricsSnapshot] = [s for s in extra if isinstance(s, dict)]
        out: list[str] = []
        for name, family in self.families.items():
            others_rows = [s.get(name) for s in others]
            _render_openmetrics_family(family, others_rows, name in self.infos, out)
        out.append("# EOF")
        out.append("")
        return "\n".join(out)


def read_snapshots(directory: str, exclude: str = "") -> list[MetricsSnapshot]:
    """The snapshots (`*.json`) in `directory` except the file named `exclude` (our own).

    Unreadable, partial or non-object files are skipped without raising: /metrics must answer
    even while a worker is dying or the directory is being cleaned up.
    """
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    result: list[MetricsSnapshot] = []
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
