"""Reading raw YAML values: the `Reader` that collects errors with their paths, converters, and
`Fields`, which reads a frozen config class naming each field once.

A converter takes a raw value and its YAML path and returns the normalized value or raises
`ConfigError`; `Reader.get` turns that into a collected error and a default, so one bad value
never stops the rest of the file from being checked.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Final, Generic, TypeVar, cast

from gateway.config.units import parse_duration, parse_size
from gateway.errors import ConfigError

T = TypeVar("T")


#: an HTTP token (RFC 9110 §5.6.2): what a header name or a method may be made of
HTTP_TOKEN: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


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
        #: the stores a stage may name, by name: their type ("memory", "redis"); the loader
        #: fills it from `stores:` before reading the stages
        self.stores: dict[str, str] = {"memory": "memory"}
        #: the declared upstream names a stage may send to (the mirror stage), filled by the
        #: loader before the stages are read; None when a kind is parsed on its own (no
        #: config around it), and then a name is not checked
        self.upstreams: set[str] | None = None

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


def choice(*values: str) -> Callable[[object, str], str]:
    """A converter to one of `values` ("must be a, b or c")."""
    listed = f"{', '.join(values[:-1])} or {values[-1]}" if len(values) > 1 else values[0]

    def convert(value: object, path: str) -> str:
        text = as_str(value, path)
        if text not in values:
            raise ConfigError(path, f"must be {listed}")
        return text

    return convert


#: reads the value at a path with the reader, reporting its own errors (possibly several);
#: returns what the caller goes on with
Parse = Callable[[Reader, object, str], Any]


@dataclass(frozen=True, slots=True)
class Nested:
    """A field read by a `Parse` (a nested mapping, or a value with several errors of its own)
    rather than by a converter; left out or null, it keeps the field's default."""

    parse: Parse


def field_defaults(cls: type) -> dict[str, object]:
    """The defaults a dataclass declares, by field name (fields without one are left out)."""
    result: dict[str, object] = {}
    for f in fields(cls):
        if f.default is not MISSING:
            result[f.name] = f.default
        elif f.default_factory is not MISSING:
            result[f.name] = f.default_factory()
    return result


@dataclass(frozen=True, slots=True)
class Fields(Generic[T]):
    """How a frozen config dataclass is read from its YAML mapping, each field named once.

    `convert` maps a YAML key — the field of the same name — to its converter (or `Nested`);
    a key left out, null or invalid takes the dataclass's default.  Keys that custom code reads
    are listed in `extra`; `check` runs on the built value (rules between fields).
    """

    cls: type[T]
    convert: Mapping[str, Callable[[object, str], object] | Nested]
    required: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    check: Callable[[Reader, T, str], None] | None = None

    def mapping(self, r: Reader, raw: object, path: str) -> dict[str, Any] | None:
        """The mapping at `path`, its keys checked; None when it is not one or lacks a
        required key (each reported).  Null is an empty mapping when nothing is required."""
        if raw is None and not self.required:
            raw = {}
        m = r.mapping(raw, path, {*self.convert, *self.extra}, required=self.required)
        if m is None or any(key not in m for key in self.required):
            return None
        return m

    def values(
        self, r: Reader, m: Mapping[str, Any], path: str, **fallback: object
    ) -> dict[str, Any]:
        """Every field of `convert`, converted; `fallback` stands in for a required field
        (one without a default) that was invalid, so later checks can go on."""
        defaults = field_defaults(self.cls) | fallback
        result: dict[str, Any] = {}
        for key, convert in self.convert.items():
            default = defaults.get(key)
            if isinstance(convert, Nested):
                raw = m.get(key)
                value = None if raw is None else convert.parse(r, raw, join_path(path, key))
                result[key] = default if value is None else value
            else:
                result[key] = r.get(m, key, path, convert, default)
        return result

    def create(self, r: Reader, values: dict[str, Any], path: str, errors: int) -> T | None:
        """The config of `values` (from `values`, completed by custom code), checked; None
        when errors were reported since there were `errors` of them."""
        config: T = cast(Callable[..., T], self.cls)(**values)
        if self.check is not None:
            self.check(r, config, path)
        return None if len(r.errors) > errors else config

    def read(self, r: Reader, raw: object, path: str, **fallback: object) -> T | None:
        """The config at `path` with each invalid value reported and its default kept, for the
        loader's own sections (any error rejects the file in the end); None when `raw` is not
        a mapping.  `fallback` replaces the dataclass's defaults (a route's `http:` rules
        default to the top-level ones)."""
        m = self.mapping(r, raw, path)
        if m is None:
            return None
        config: T = cast(Callable[..., T], self.cls)(**self.values(r, m, path, **fallback))
        if self.check is not None:
            self.check(r, config, path)
        return config

    def parse(self, r: Reader, raw: object, path: str) -> T | None:
        """The config at `path` when every field is read by `convert`."""
        m = self.mapping(r, raw, path)
        if m is None:
            return None
        errors = len(r.errors)
        return self.create(r, self.values(r, m, path), path, errors)
