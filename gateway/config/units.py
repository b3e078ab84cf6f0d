"""Durations and sizes as written in the YAML: `250ms`, `5s`, `1m`, `24h`; `16KiB`, `10MiB`."""

from __future__ import annotations

import re
from typing import Final

from gateway.errors import ConfigError

_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE: Final = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS: Final = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_duration(value: object, path: str) -> float:
    """Seconds; a unit is required so `30` can never mean milliseconds to one reader."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ConfigError(
        path, f"must be a duration with a unit like 250ms, 5s, 1m or 24h, not {value!r}"
    )


def parse_size(value: object, path: str) -> int:
    """Bytes, from an integer or a string like 16KiB, 10MiB, 1GiB, 512B."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(path, "must not be negative")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    raise ConfigError(
        path, f"must be a size in bytes or with a unit (KiB, MiB, GiB), not {value!r}"
    )
