"""W3C Trace Context (https://www.w3.org/TR/trace-context/): reading `traceparent` and
`tracestate`, making ids, and the sampling decision — pure, no clock, no SDK.

`traceparent` is `version-traceid-parentid-flags` in lower-case hex.  Version 00 is exactly 55
characters; a later version may carry more fields after a `-`, which are ignored (the spec's
forward-compatibility rule); version ff, upper-case hex, all-zero ids or any other shape make
the header invalid, and an invalid header starts a new trace — never an error for the client.
`tracestate` is only read when `traceparent` was valid, and is passed on unchanged unless it is
over the spec's bounds (512 characters, 32 entries): then whole entries are dropped, those
longer than 128 characters first, then from the end, as the spec recommends.

Sampling is parent-based: a valid parent's sampled flag decides; a new trace is sampled when the
low 64 bits of its random trace id fall under `ratio` * 2^64, the rule of OpenTelemetry's
TraceIdRatioBased sampler, so every service using that rule agrees on the same trace.

Cost (every traced request makes a trace id, and a span id per upstream try): ids are ASCII
hex bytes — what goes into the `traceparent` line — cut from a pool of random hex digits filled
from `os.urandom` 4 KiB at a time, and the ratio rule compares the id's last 16 hex digits with
the threshold's as bytes (fixed-width lower-case hex sorts as its value), so no id is formatted
or parsed as an integer, nor decoded, on the request path.  A pool holding a run of 16 zeros is
drawn again, so no id cut from it is all zeros and the ids need no check of their own.
"""

from __future__ import annotations

import binascii
import os
from typing import Final, final

_HEX: Final = frozenset("0123456789abcdef")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
_ZERO_SPAN_ID: Final = b"0" * 16
#: the spec's bounds a vendor must propagate at least; beyond them entries are dropped
TRACESTATE_MAX_CHARS: Final = 512
TRACESTATE_MAX_ENTRIES: Final = 32
_TRACESTATE_LONG_ENTRY: Final = 128
#: random bytes drawn at a time for ids (8 KiB of hex: 256 trace ids)
_POOL_BYTES: Final = 4096
#: a threshold every 16-digit hex string sorts under ("g" follows "f")
_ALWAYS: Final = b"g"


@final
class ParentContext:
    """A valid incoming `traceparent` (and the `tracestate` that came with it)."""

    __slots__ = ("sampled", "span_id", "trace_id", "tracestate")

    def __init__(self, trace_id: str, span_id: str, sampled: bool, tracestate: str | None) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.sampled = sampled
        self.tracestate = tracestate


def _is_hex(text: str) -> bool:
    return all(c in _HEX for c in text)


def parse_traceparent(value: str) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a valid header value, else None."""
    if len(value) < 55:
        return None
    version = value[0:2]
    if (
        value[2] != "-"
        or value[35] != "-"
        or value[52] != "-"
        or not _is_hex(version)
        or version == "ff"
    ):
        return None
    if len(value) != 55 and (version == "00" or value[55] != "-"):
        return None
    trace_id = value[3:35]
    span_id = value[36:52]
    flags = value[53:55]
    if not (_is_hex(trace_id) and _is_hex(span_id) and _is_hex(flags)):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def bound_tracestate(value: str) -> str | None:
    """`value` unchanged when within the spec's bounds, else with whole entries dropped (long
    ones first, then from the end); None when nothing is left."""
    if len(value) <= TRACESTATE_MAX_CHARS and value.count(",") < TRACESTATE_MAX_ENTRIES:
        return value or None
    entries = [e.strip() for e in value.split(",")]
    entries = [e for e in entries if e]
    kept = ",".join(entries)
    if len(kept) > TRACESTATE_MAX_CHARS or len(entries) > TRACESTATE_MAX_ENTRIES:
        entries = [e for e in entries if len(e) <= _TRACESTATE_LONG_ENTRY]
    while entries and (
        len(entries) > TRACESTATE_MAX_ENTRIES or len(",".join(entries)) > TRACESTATE_MAX_CHARS
    ):
        entries.pop()
    return ",".join(entries) or None


def read_parent(traceparent: list[str], tracestate: list[str]) -> ParentContext | None:
    """The parent a request's headers carry: exactly one valid `traceparent` (several are
    ambiguous, hence invalid); `tracestate` fields joined as one list, bounded."""
    if len(traceparent) != 1:
        return None
    parsed = parse_traceparent(traceparent[0])
    if parsed is None:
        return None
    trace_id, span_id, sampled = parsed
    state = bound_tracestate(",".join(tracestate)) if tracestate else None
    return ParentContext(trace_id, span_id, sampled, state)


@final
class _HexPool:
    """Random hex digits, handed out in slices (os.urandom: never a seeded generator that a
    forked child would repeat; the pool itself is emptied in a forked child)."""

    __slots__ = ("digits", "used")

    def __init__(self) -> None:
        self.digits = b""
        self.used = 0

    def take(self, count: int) -> bytes:
        start = self.used
        end = start + count
        if end > len(self.digits):
            self.digits = _random_hex()
            start = 0
            end = count
        self.used = end
        return self.digits[start:end]

    def reset(self) -> None:
        self.digits = b""
        self.used = 0


def _random_hex() -> bytes:
    """_POOL_BYTES random bytes as hex digits, with no run of 16 zeros: then no slice of 16 or
    32 digits is all zeros (W3C Trace Context forbids all-zero ids).  A draw is redone about
    once in 10^15."""
    while True:
        digits = binascii.hexlify(os.urandom(_POOL_BYTES))
        if _ZERO_SPAN_ID not in digits:
            return digits


_POOL: Final = _HexPool()
os.register_at_fork(after_in_child=_POOL.reset)


def new_trace_id() -> bytes:
    """128 random bits as 32 ASCII hex digits (never all zeros: see _random_hex)."""
    return _POOL.take(32)


def new_span_id() -> bytes:
    """64 random bits as 16 ASCII hex digits (never all zeros: see _random_hex)."""
    return _POOL.take(16)


def ratio_bound(ratio: float) -> bytes:
    """The threshold `sampled_by_ratio` compares with: the 16 hex digits of `ratio` * 2^64, so
    that share of all trace ids falls under it (b"" for 0: none; b"g" for 1: all)."""
    if ratio <= 0.0:
        return b""
    bound = round(ratio * (1 << 64))
    if ratio >= 1.0 or bound >= 1 << 64:
        return _ALWAYS
    return f"{bound:016x}".encode()


def sampled_by_ratio(trace_id: bytes, bound: bytes) -> bool:
    """Whether a new trace is sampled: its id's low 64 bits under `bound` (ratio_bound)."""
    if not bound:
        return False
    # the first digits decide 15 times in 16, without slicing the id (compiled: ints)
    digit = trace_id[16]
    first = bound[0]
    if digit != first:
        return digit < first
    return trace_id[16:] < bound


def traceparent(trace_id: str, span_id: str, sampled: bool) -> str:
    """A version-00 `traceparent` value."""
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"
