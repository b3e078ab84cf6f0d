"""Reading the `tracing:` section (SPEC §2) and a route's `tracing: {sample_ratio}`."""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import urlsplit

from gateway.config.model import TracingBatchConfig, TracingConfig
from gateway.config.reader import (
    HTTP_TOKEN,
    Fields,
    Nested,
    Reader,
    as_str,
    choice,
    positive_duration,
    positive_int,
    ratio,
)
from gateway.errors import ConfigError


def _non_empty(value: object, path: str) -> str:
    text = as_str(value, path)
    if not text.strip():
        raise ConfigError(path, "must not be empty")
    return text


def _collector_url(value: object, path: str) -> str:
    text = as_str(value, path)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(path, "must be an http:// or https:// URL of the collector")
    return text


def _string_map(value: object, path: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ConfigError(path, "must be a mapping of names to strings")
    result = []
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str | int | float | bool):
            raise ConfigError(f"{path}.{key}", "must be a string")
        result.append((key, str(item)))
    return tuple(result)


def _export_headers(value: object, path: str) -> tuple[tuple[str, str], ...]:
    headers = _string_map(value, path)
    for name, item in headers:
        if not HTTP_TOKEN.match(name):
            raise ConfigError(f"{path}.{name}", "is not a valid header name")
        if any(c in item for c in "\r\n\0"):
            # the value is not echoed: it is usually a credential
            raise ConfigError(f"{path}.{name}", "must not contain CR, LF or NUL")
    return headers


def _check_batch(r: Reader, config: TracingBatchConfig, path: str) -> None:
    if config.max_export_batch_size > config.max_queue_size:
        r.error(f"{path}.max_export_batch_size", "must not exceed max_queue_size")


_BATCH: Final = Fields(
    TracingBatchConfig,
    {
        "max_queue_size": positive_int,
        "max_export_batch_size": positive_int,
        "schedule_delay": positive_duration,
    },
    check=_check_batch,
)


def _batch(r: Reader, raw: object, path: str) -> TracingBatchConfig | None:
    return _BATCH.read(r, raw, path)


TRACING: Final = Fields(
    TracingConfig,
    {
        "service_name": _non_empty,
        "sample_ratio": ratio,
        "exporter": choice("none", "console", "otlp"),
        "protocol": choice("http/protobuf", "grpc"),
        "endpoint": _collector_url,
        "headers": _export_headers,
        "resource": _string_map,
        "timeout": positive_duration,
        "batch": Nested(_batch),
    },
)


def read_tracing(r: Reader, raw: object) -> TracingConfig | None:
    """The top-level section; None when it is absent (tracing off)."""
    if raw is None:
        return None
    return TRACING.read(r, raw, "tracing")


def read_route_tracing(r: Reader, raw: object, path: str, tracing: object) -> float | None:
    """A route's `tracing: {sample_ratio}`; None when absent."""
    if raw is None:
        return None
    m: dict[str, Any] | None = r.mapping(raw, path, {"sample_ratio"}, required=("sample_ratio",))
    if m is None or "sample_ratio" not in m:
        return None
    if tracing is None:
        r.error(path, "needs the top-level tracing section (tracing is off without it)")
        return None
    return r.get(m, "sample_ratio", path, ratio, None)
