"""JSON-lines logging for the stdlib `logging` module: one object per line on stdout.

Each line has time (RFC 3339 UTC, milliseconds), level, type ("app"; the access log's lines,
written by access_log.py, have "access" and the same first fields), logger, message (lazy `%`
arguments applied), `trace_id` and `span_id` when written while a traced request is handled,
every `extra={...}` field, and `exc` / `stack` when a traceback was asked for.  The
handler looks up `sys.stdout` per record, so redirecting stdout (or pytest's capture) is
honoured.  Secret hygiene: `redact_headers` for header lists, and `extra` fields named like a
credential are written as "[redacted]" — no log line carries a token, key or cookie.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any, Final

from gateway.observability.request_trace import current_trace

REDACTED: Final = "[redacted]"
SECRET_HEADERS: Final = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "idempotency-key"}
)
_SECRET_SUFFIXES: Final = ("token", "password", "secret", "api-key", "authorization", "cookie")
#: the fixed fields of a line; an `extra` field of the same name does not replace them
_BASE_FIELDS: Final = frozenset(
    {"time", "level", "type", "logger", "message", "trace_id", "span_id", "exc", "stack"}
)
#: attributes every LogRecord has; anything else on a record came from `extra=`
_RECORD_ATTRIBUTES: Final = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

# (whole second, its formatted prefix): many lines share a second, and strftime is the
# costly part.  A tuple is swapped in one assignment, so threads that log never see it torn.
_second_cache: tuple[int, str] = (-1, "")


def rfc3339(epoch: float) -> str:
    """`epoch` as RFC 3339 UTC with milliseconds: 2026-11-22T10:00:00.123Z."""
    global _second_cache
    millis_total = round(epoch * 1000)
    second, millis = divmod(millis_total, 1000)
    cached_second, prefix = _second_cache
    if second != cached_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second_cache = (second, prefix)
    return f"{prefix}.{millis:03d}Z"


def is_secret_name(name: str) -> bool:
    """Whether a header or field name names a credential (case and `_`/`-` insensitive)."""
    lowered = name.lower().replace("_", "-")
    return lowered in SECRET_HEADERS or lowered.endswith(_SECRET_SUFFIXES)


def redact_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers with the values of credential-bearing ones replaced by "[redacted]"."""
    return [(n, REDACTED if n.lower() in SECRET_HEADERS else v) for n, v in headers]


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object (no newline inside: tracebacks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname,
            "type": "app",
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace = current_trace()
        if trace is not None:
            out["trace_id"] = trace.trace_id
            out["span_id"] = trace.span_id
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRIBUTES or key in _BASE_FIELDS or key.startswith("_"):
                continue
            out[key] = REDACTED if is_secret_name(key) else value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra value that JSON cannot carry is logged as its str()
        return json.dumps(out, default=str, separators=(",", ":"))


class JsonStdoutHandler(logging.Handler):
    """Writes each formatted record and a newline to the current `sys.stdout`, then flushes."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            stream = sys.stdout
            stream.write(line + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def setup_logging(level: str = "INFO") -> None:
    """Install the JSON handler on the root logger; calling it again only changes the level."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    root.setLevel(numeric)
    if not any(isinstance(h, JsonStdoutHandler) for h in root.handlers):
        root.addHandler(JsonStdoutHandler())
