"""W3C Trace Context reading, ids and the sampling rule (gateway/core/trace_context.py)."""

from __future__ import annotations

import os

import pytest

from gateway.core.trace_context import (
    _POOL,
    TRACESTATE_MAX_CHARS,
    bound_tracestate,
    new_span_id,
    new_trace_id,
    parse_traceparent,
    ratio_bound,
    read_parent,
    sampled_by_ratio,
    traceparent,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"00-{TRACE}-{SPAN}-01", (TRACE, SPAN, True)),
        (f"00-{TRACE}-{SPAN}-00", (TRACE, SPAN, False)),
        # only the sampled bit counts; other flag bits are carried by later versions
        (f"00-{TRACE}-{SPAN}-03", (TRACE, SPAN, True)),
        (f"00-{TRACE}-{SPAN}-02", (TRACE, SPAN, False)),
        # a later version: read as 00, fields after a dash ignored
        (f"01-{TRACE}-{SPAN}-01", (TRACE, SPAN, True)),
        (f"cc-{TRACE}-{SPAN}-01-what-the-future-holds", (TRACE, SPAN, True)),
    ],
    ids=["sampled", "not-sampled", "other-flag-bits", "other-bit-only", "v01", "future-fields"],
)
def test_valid_traceparent(value: str, expected: tuple[str, str, bool]) -> None:
    assert parse_traceparent(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        f"00-{TRACE}-{SPAN}-0",
        f"00-{TRACE}-{SPAN}-01-",  # version 00 is exactly 55 characters
        f"00-{TRACE}-{SPAN}-01x",
        f"cc-{TRACE}-{SPAN}-01x",  # a later version's extra field must follow a dash
        f"ff-{TRACE}-{SPAN}-01",  # version ff is forbidden
        f"0g-{TRACE}-{SPAN}-01",
        f"00-{TRACE.upper()}-{SPAN}-01",  # lower-case hex only
        f"00-{TRACE}-{SPAN.upper()}-01",
        f"00-{'0' * 32}-{SPAN}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE}-{SPAN}-0z",
        f"00_{TRACE}-{SPAN}-01",
        f"00-{TRACE[:-1]}x-{SPAN}-01",
        f" 00-{TRACE}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}--1",
    ],
    ids=[
        "empty",
        "short",
        "v00-too-long",
        "v00-junk",
        "future-no-dash",
        "version-ff",
        "version-not-hex",
        "trace-upper",
        "span-upper",
        "trace-zero",
        "span-zero",
        "flags-not-hex",
        "bad-separator",
        "trace-not-hex",
        "leading-space",
        "flags-sign",
    ],
)
def test_invalid_traceparent(value: str) -> None:
    assert parse_traceparent(value) is None


def test_read_parent_takes_exactly_one_traceparent_and_joins_tracestate() -> None:
    parent = read_parent([f"00-{TRACE}-{SPAN}-01"], ["a=1", "b=2,c=3"])
    assert parent is not None
    assert (parent.trace_id, parent.span_id, parent.sampled) == (TRACE, SPAN, True)
    assert parent.tracestate == "a=1,b=2,c=3"
    # two traceparent fields: ambiguous, a new trace
    assert read_parent([f"00-{TRACE}-{SPAN}-01"] * 2, []) is None
    assert read_parent([], ["a=1"]) is None
    no_state = read_parent([f"00-{TRACE}-{SPAN}-00"], [])
    assert no_state is not None
    assert no_state.tracestate is None


def test_tracestate_within_bounds_passes_unchanged() -> None:
    value = "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7"
    assert bound_tracestate(value) == value
    exactly = ",".join(f"k{i}=" + "v" * 10 for i in range(32))
    assert len(exactly) <= TRACESTATE_MAX_CHARS
    assert bound_tracestate(exactly) == exactly


def test_tracestate_over_bounds_drops_long_entries_first_then_from_the_end() -> None:
    long_entry = "big=" + "x" * 200
    small = [f"k{i}=" + "v" * 20 for i in range(20)]  # 20 x 24 chars + commas = 499
    value = ",".join([small[0], long_entry, *small[1:]])
    assert len(value) > TRACESTATE_MAX_CHARS
    assert bound_tracestate(value) == ",".join(small)
    too_many = [f"k{i}=v" for i in range(40)]
    assert bound_tracestate(",".join(too_many)) == ",".join(too_many[:32])
    too_long = [f"k{i}=" + "v" * 100 for i in range(10)]  # none over 128, 1049 chars
    bounded = bound_tracestate(",".join(too_long))
    assert bounded == ",".join(too_long[:4])
    assert bounded is not None
    assert len(bounded) <= TRACESTATE_MAX_CHARS


def test_ids_are_lower_hex_of_the_right_length_and_differ() -> None:
    traces = {new_trace_id().decode() for _ in range(100)}
    spans = {new_span_id().decode() for _ in range(100)}
    assert len(traces) == 100
    assert len(spans) == 100
    for trace_id in traces:
        assert parse_traceparent(traceparent(trace_id, SPAN, True)) == (trace_id, SPAN, True)
    for span_id in spans:
        assert len(span_id) == 16
        assert int(span_id, 16) != 0


def test_traceparent_format() -> None:
    assert traceparent(TRACE, SPAN, True) == f"00-{TRACE}-{SPAN}-01"
    assert traceparent(TRACE, SPAN, False) == f"00-{TRACE}-{SPAN}-00"


@pytest.mark.parametrize(
    ("ratio", "low", "expected"),
    [
        (0.0, 0, False),
        (1.0, (1 << 64) - 1, True),
        (0.5, (1 << 63) - 1, True),
        (0.5, 1 << 63, False),
        (0.01, 0, True),
        (0.01, round(0.01 * (1 << 64)) - 1, True),
        (0.01, round(0.01 * (1 << 64)), False),
        (1 - 1e-18, (1 << 64) - 1, True),
        (0.01, 1 << 63, False),
    ],
    ids=[
        "zero-never",
        "one-always",
        "half-under",
        "half-at",
        "low-id-under-one-percent",
        "just-under-one-percent",
        "at-one-percent",
        "rounds-to-all",
        "first-digit-over",
    ],
)
def test_ratio_rule_on_the_low_64_bits(ratio: float, low: int, expected: bool) -> None:
    trace_id = b"f" * 16 + f"{low:016x}".encode()
    assert sampled_by_ratio(trace_id, ratio_bound(ratio)) is expected


def test_ratio_samples_about_the_share_asked_for() -> None:
    bound = ratio_bound(0.25)
    sampled = sum(sampled_by_ratio(new_trace_id(), bound) for _ in range(20_000))
    # binomial(20000, 0.25): sd ~61; 6 sd either side fails falsely about once in 1e9 runs
    assert 5000 - 370 <= sampled <= 5000 + 370


def test_a_draw_with_a_run_of_zeros_is_drawn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """No id may be all zeros and ids are not checked one by one: a pool whose digits hold a
    run of 16 zeros (8 zero bytes, here in the middle of a draw) is replaced before use."""
    draws: list[bytes] = []
    real = os.urandom

    def urandom(size: int) -> bytes:
        data = bytearray(real(size))
        if not draws:
            data[1000:1008] = bytes(8)  # the first draw holds a zero span id's digits
        draws.append(bytes(data))
        return bytes(data)

    monkeypatch.setattr(os, "urandom", urandom)
    _POOL.reset()
    ids = [new_span_id() for _ in range(512)]  # all 8 KiB of the pool's digits
    assert len(draws) == 2
    assert b"0" * 16 not in b"".join(ids)
    assert ids[0] == draws[1].hex().encode()[:16]
    _POOL.reset()


def test_a_forked_child_never_repeats_the_parents_ids() -> None:
    new_trace_id()  # the pool is filled: a child that kept it would hand out the same ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.write(write, new_trace_id())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert status == 0
    assert len(child) == 32
    assert child != new_trace_id().decode()
