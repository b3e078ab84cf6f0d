"""Exposition: the registry of one process's metric families, the Prometheus text format 0.0.4,
and /metrics across workers.

With several workers each one publishes `Registry.snapshot()` to a file (`write_snapshot`) and
the worker serving /metrics renders its live values merged with the others' snapshots
(`read_snapshots`): counters and histograms add, gauges follow their family's `merge` mode.
Nothing here runs per request: the data plane only touches the children (instruments.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

from gateway.observability.instruments import (
    DEFAULT_BUCKETS,
    AnyFamily,
    Counter,
    Gauge,
    Histogram,
    Merge,
)

#: one worker's live values as plain JSON data, {family name: rows}: what it publishes to its file
MetricsSnapshot = dict[str, Any]


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
