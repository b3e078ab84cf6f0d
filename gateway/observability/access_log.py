"""The access log (SPEC §10): one JSON line per request on stdout.

Sampling: a disabled log writes nothing; a status >= `always_log_status` is always written;
any other request is written when `random() < sample_ratio`.  `record(entry)` applies these
rules; the data plane may call `wants(status)` first and `emit(entry)` after, so that an
unsampled request never builds its entry (one comparison and at most one random draw).

Secrets: the entry has no field for headers, cookies, query strings or tokens, and `path` is cut
at any "?", so nothing secret can reach a line.  json.dumps escapes control characters and
non-ASCII, so one entry is always exactly one line.

Writing: stdout is a pipe to a log collector, and a write system call per request would cost
more than the rest of the logging.  `STDOUT` collects complete lines and writes them with one
`write` + `flush` when `FLUSH_LINES` lines are pending or the next line would take the batch past
`FLUSH_BYTES`, and whenever the app's periodic sweep calls `flush()`.  FLUSH_BYTES is PIPE_BUF,
so with several workers on one pipe each batch is written atomically and lines never interleave.
A batch is small, so a slow collector stalls the loop for one bounded write at most per batch;
if stdout is closed or broken the batch is dropped rather than failing the request.  `STDOUT` is
one process-wide buffer shared by every snapshot's AccessLog, so lines of requests that finish
on a retired snapshot are flushed with the rest.
"""

from __future__ import annotations

import json
import random as _random
import sys
from collections.abc import Callable
from typing import Any, Final, TextIO, final

from gateway.config.model import AccessLogConfig
from gateway.observability.logs import rfc3339

#: every field of a line, in order; `exclude_fields` names some of these.  The first three are
#: the schema every line on stdout shares (gateway.observability.logs writes the others)
FIELDS: Final = (
    "time",
    "level",
    "type",
    "request_id",
    "trace_id",
    "span_id",
    "route",
    "method",
    "path",
    "status",
    "duration_ms",
    "upstream",
    "endpoint",
    "attempts",
    "bytes_in",
    "bytes_out",
    "client",
    "peer",
    "stages",
)
FLUSH_LINES: Final = 64
# built once: json.dumps with arguments builds a new encoder per call; entries hold no cycles
_encode: Final = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
#: POSIX guarantees writes up to PIPE_BUF (4096 on Linux) to a pipe are not interleaved
FLUSH_BYTES: Final = 4096


@final
class AccessEntry:
    """What the data plane knows about one finished request."""

    __slots__ = tuple(f for f in FIELDS if f not in ("level", "type"))

    def __init__(
        self,
        *,
        time: float,
        request_id: str,
        trace_id: str | None,
        span_id: str | None,
        route: str | None,
        method: str,
        path: str,
        status: int,
        duration_ms: float,
        upstream: str | None,
        endpoint: str | None,
        attempts: int,
        bytes_in: int,
        bytes_out: int,
        client: str,
        stages: dict[str, str],
        peer: str,
    ) -> None:
        self.time = time
        self.request_id = request_id
        self.trace_id = trace_id
        #: the gateway's SERVER span for the request (the parent of its upstream tries' spans)
        self.span_id = span_id
        self.route = route
        self.method = method
        self.path = path
        self.status = status
        self.duration_ms = duration_ms
        self.upstream = upstream
        self.endpoint = endpoint
        self.attempts = attempts
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        #: the client the stages judged: behind `trusted_proxies`, the nearest untrusted
        #: X-Forwarded-For hop; `peer` is the connection's own address
        self.client = client
        self.peer = peer
        #: stage name -> outcome, for the stages that decided something
        self.stages = stages

    def as_dict(self) -> dict[str, Any]:
        """The line's fields: time as RFC 3339, path without any query."""
        path = self.path
        cut = path.find("?")
        return {
            "time": rfc3339(self.time),
            # an answer the gateway failed to give well is an error line, like a logged error
            "level": "ERROR" if self.status >= 500 else "INFO",
            "type": "access",
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "route": self.route,
            "method": self.method,
            "path": path if cut < 0 else path[:cut],
            "status": self.status,
            "duration_ms": self.duration_ms,
            "upstream": self.upstream,
            "endpoint": self.endpoint,
            "attempts": self.attempts,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "client": self.client,
            "peer": self.peer,
            "stages": self.stages,
        }


@final
class StdoutLines:
    """Collects lines and writes them in batches of whole lines to `stream`.

    `stream` None means the `sys.stdout` of the moment of each write, so a redirection made
    after start-up is honoured.
    """

    __slots__ = ("_lines", "_size", "max_bytes", "max_lines", "stream")

    def __init__(
        self,
        *,
        max_lines: int = FLUSH_LINES,
        max_bytes: int = FLUSH_BYTES,
        stream: TextIO | None = None,
    ) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.stream = stream
        self._lines: list[str] = []
        self._size = 0

    def __call__(self, line: str) -> None:
        size = len(line) + 1  # ASCII only (json.dumps escapes the rest), so chars == bytes
        if self._lines and self._size + size > self.max_bytes:
            self.flush()
        self._lines.append(line)
        self._size += size
        if len(self._lines) >= self.max_lines or self._size >= self.max_bytes:
            self.flush()

    @property
    def pending(self) -> int:
        return len(self._lines)

    def flush(self) -> None:
        if not self._lines:
            return
        self._lines.append("")
        data = "\n".join(self._lines)
        self._lines.clear()
        self._size = 0
        stream = self.stream if self.stream is not None else sys.stdout
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError):
            # stdout closed or the collector gone: losing log lines beats failing requests
            pass


#: the process-wide stdout buffer every AccessLog writes to by default
STDOUT: Final = StdoutLines()


def _no_flush() -> None:
    return None


@final
class AccessLog:
    """Decides which requests are logged and writes their lines through `write`."""

    __slots__ = ("_always", "_excluded", "_flush", "_random", "_ratio", "_write", "enabled")

    def __init__(
        self,
        config: AccessLogConfig,
        write: Callable[[str], None] | None = None,
        random: Callable[[], float] = _random.random,
        flush: Callable[[], None] | None = None,
    ) -> None:
        """Lines go to `write`, by default the shared `STDOUT` buffer, which `flush` writes
        out; a writer given here writes each line itself unless its `flush` is given too."""
        self.enabled = config.enabled
        self._ratio = config.sample_ratio
        self._always = config.always_log_status
        self._excluded = tuple(name for name in FIELDS if name in config.exclude_fields)
        if write is None:
            write = STDOUT
            if flush is None:
                flush = STDOUT.flush
        self._write = write
        self._random = random
        self._flush = flush if flush is not None else _no_flush

    def wants(self, status: int) -> bool:
        """Whether a request with this status is logged; draws at most one random number."""
        if not self.enabled:
            return False
        if status >= self._always:
            return True
        return self._random() < self._ratio

    def record(self, entry: AccessEntry) -> None:
        """Apply the sampling rules to `entry` and write its line if it is chosen."""
        if self.wants(entry.status):
            self.emit(entry)

    def emit(self, entry: AccessEntry) -> None:
        """Write `entry`'s line unconditionally (the caller already asked `wants`)."""
        fields = entry.as_dict()
        for name in self._excluded:
            del fields[name]
        self._write(_encode(fields))

    def flush(self) -> None:
        """Write out buffered lines; the app calls this on a timer and at shutdown."""
        self._flush()


def loggable_path(path: str) -> str:
    """The path as the access log shows it: each segment's ";params" — which may carry a session
    id (;jsessionid=…) — replaced by ";…" (the query is never in `path` at all)."""
    if ";" not in path:
        return path
    return "/".join(
        segment.partition(";")[0] + ";…" if ";" in segment else segment
        for segment in path.split("/")
    )
