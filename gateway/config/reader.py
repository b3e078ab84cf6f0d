"""Reading raw YAML values: the `Reader` that collects errors with their paths, and converters.

A converter takes a raw value and its YAML path and returns the normalized value or raises
`ConfigError`; `Reader.get` turns that into a collected error and a default, so one bad value
never stops the rest of the file from being checked.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

from gateway.config.units import parse_duration, parse_size
from gateway.errors import ConfigError

T = TypeVar("T")


def join_path(path: str, key: object) -> str:
    """The YAML path of `key` in the mapping at `path` (`routes[0].match` + `host`)."""
    return f"{path}.{key}" if path else str(key)


class Reader:
    """Walks raw YAML, collecting errors with their paths."""

    def __init__(self, unset: Collection[str] = ()) -> None:
        self.errors: list[ConfigError] = []
        #: resolves a file the config references (relative to it) and records it, or reports
        #: the error and returns None; the loader provides it
        self.resolve_file: Callable[[object, str], Path | None] = _no_files
        #: paths whose value names an unset environment variable (reported as such): what the
        #: value should have been is unknown, so an error at or under one is not reported —
        #: and, not being counted, does not drop a stage that later checks would miss
        self._unset = tuple(unset)

    def error(self, path: str, message: str) -> None:
        self.add(ConfigError(path, message))

    def add(self, error: ConfigError) -> None:
        if not any(_within(error.path, path) for path in self._unset):
            self.errors.append(error)

    def mapping(
        self,
        value: object,
        path: str,
        keys: set[str],
        later: Mapping[str, str] | None = None,
        required: tuple[str, ...] = (),
    ) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.error(path, "must be a mapping")
            return None
        for key in value:
            where = join_path(path, key)
            if later and key in later:
                self.error(where, f"not supported yet (arrives with {later[key]})")
            elif key not in keys:
                hint = difflib.get_close_matches(str(key), sorted(keys), n=1)
                self.error(where, "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        for key in required:
            if key not in value:
                self.error(join_path(path, key), "is required")
        return {k: v for k, v in value.items() if k in keys}

    def get(
        self,
        raw: Mapping[str, Any],
        key: str,
        path: str,
        convert: Callable[[object, str], T],
        default: T,
    ) -> T:
        if key not in raw or raw[key] is None:
            return default
        where = join_path(path, key)
        try:
            return convert(raw[key], where)
        except ConfigError as exc:
            self.add(exc)
            return default


def _within(path: str, parent: str) -> bool:
    """Whether `path` is `parent` or inside it."""
    return path == parent or path.startswith((f"{parent}.", f"{parent}["))


def _no_files(raw: object, path: str) -> Path | None:
    raise ConfigError(path, "files cannot be referenced here")


def as_str(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, "must be a string")
    return value


def as_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, "must be true or false")
    return value


def as_int(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, "must be an integer")
    return value


def positive_int(value: object, path: str) -> int:
    result = as_int(value, path)
    if result <= 0:
        raise ConfigError(path, "must be > 0")
    return result


def ratio(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(path, "must be a number")
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(path, "must be between 0 and 1")
    return float(value)


def positive_duration(value: object, path: str) -> float:
    result = parse_duration(value, path)
    if result <= 0:
        raise ConfigError(path, "must be > 0")
    return result


def positive_size(value: object, path: str) -> int:
    result = parse_size(value, path)
    if result <= 0:
        raise ConfigError(path, "must be > 0")
    return result


def str_list(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(path, "must be a list of strings")
    return tuple(value)


def status(value: object, path: str) -> int:
    result = as_int(value, path)
    if not 100 <= result <= 599:
        raise ConfigError(path, "must be an HTTP status between 100 and 599")
    return result
