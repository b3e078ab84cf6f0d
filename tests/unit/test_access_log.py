"""gateway.observability.access_log: sampling rules, line shape, batching to stdout."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateway.config.model import AccessLogConfig
from gateway.observability.access_log import (
    FIELDS,
    STDOUT,
    AccessEntry,
    AccessLog,
    StdoutLines,
    loggable_path,
)


def entry(**overrides: Any) -> AccessEntry:
    fields: dict[str, Any] = {
        "time": 1_763_805_600.25,
        "request_id": "req-1",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "span_id": "00f067aa0ba902b7",
        "route": "users",
        "method": "GET",
        "path": "/api/users/7",
        "status": 200,
        "duration_ms": 12.5,
        "upstream": "users-svc",
        "endpoint": "10.0.0.5:8080",
        "attempts": 1,
        "bytes_in": 0,
        "bytes_out": 321,
        "client": "192.0.2.10",
        "peer": "10.0.0.1",
        "stages": {"rate_limit": "allowed"},
    }
    fields.update(overrides)
    return AccessEntry(**fields)


def draws(*values: float) -> tuple[Callable[[], float], list[float]]:
    """A fake random() returning `values` in order, and the list of values it handed out."""
    handed: list[float] = []
    it: Iterator[float] = iter(values)

    def random() -> float:
        value = next(it)
        handed.append(value)
        return value

    return random, handed


def logged(log_lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_lines]


def test_successes_are_sampled_by_ratio() -> None:
    lines: list[str] = []
    random, _ = draws(0.1, 0.7, 0.49, 0.5, 0.0)
    log = AccessLog(AccessLogConfig(sample_ratio=0.5), write=lines.append, random=random)
    for request_id in ("a", "b", "c", "d", "e"):
        log.record(entry(request_id=request_id))
    assert [line["request_id"] for line in logged(lines)] == ["a", "c", "e"]


def test_errors_are_always_logged_without_a_draw() -> None:
    lines: list[str] = []
    random, handed = draws(0.99)
    config = AccessLogConfig(sample_ratio=0.0, always_log_status=500)
    log = AccessLog(config, write=lines.append, random=random)
    log.record(entry(status=500))
    log.record(entry(status=503))
    assert handed == []
    log.record(entry(status=499))  # below the threshold: sampled, and ratio 0 drops it
    assert handed == [0.99]
    assert [line["status"] for line in logged(lines)] == [500, 503]


def test_always_log_threshold_is_configurable() -> None:
    lines: list[str] = []
    random, _ = draws(0.9, 0.9)
    config = AccessLogConfig(sample_ratio=0.1, always_log_status=400)
    log = AccessLog(config, write=lines.append, random=random)
    for status in (404, 400, 399, 302):
        log.record(entry(status=status))
    assert [line["status"] for line in logged(lines)] == [404, 400]


def test_disabled_logs_nothing_even_errors() -> None:
    lines: list[str] = []
    random, handed = draws()
    log = AccessLog(AccessLogConfig(enabled=False), write=lines.append, random=random)
    log.record(entry(status=500))
    log.record(entry(status=200))
    assert lines == []
    assert handed == []
    assert not log.wants(502)


def test_wants_then_emit_is_record_split_in_two() -> None:
    lines: list[str] = []
    random, handed = draws(0.3, 0.8)
    log = AccessLog(AccessLogConfig(sample_ratio=0.5), write=lines.append, random=random)
    assert log.wants(200)
    assert not log.wants(200)
    assert handed == [0.3, 0.8]
    log.emit(entry(request_id="chosen"))
    assert [line["request_id"] for line in logged(lines)] == ["chosen"]


def test_line_shape() -> None:
    lines: list[str] = []
    AccessLog(AccessLogConfig(), write=lines.append).record(entry())
    assert len(lines) == 1
    line = lines[0]
    assert "\n" not in line
    assert ", " not in line  # compact separators
    data = json.loads(line)
    assert list(data) == list(FIELDS)
    assert data == {
        "time": "2025-11-22T10:00:00.250Z",
        "level": "INFO",
        "type": "access",
        "request_id": "req-1",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "span_id": "00f067aa0ba902b7",
        "route": "users",
        "method": "GET",
        "path": "/api/users/7",
        "status": 200,
        "duration_ms": 12.5,
        "upstream": "users-svc",
        "endpoint": "10.0.0.5:8080",
        "attempts": 1,
        "bytes_in": 0,
        "bytes_out": 321,
        "client": "192.0.2.10",
        "peer": "10.0.0.1",
        "stages": {"rate_limit": "allowed"},
    }


def test_unrouted_request_has_nulls_and_empty_stages() -> None:
    lines: list[str] = []
    AccessLog(AccessLogConfig(), write=lines.append).record(
        entry(
            route=None,
            upstream=None,
            endpoint=None,
            trace_id=None,
            span_id=None,
            attempts=0,
            stages={},
            status=404,
        )
    )
    data = logged(lines)[0]
    assert (data["route"], data["upstream"], data["endpoint"], data["trace_id"]) == (None,) * 4
    assert data["stages"] == {}


def test_exclude_fields_drops_them() -> None:
    lines: list[str] = []
    config = AccessLogConfig(exclude_fields=("client", "trace_id", "no_such_field"))
    AccessLog(config, write=lines.append).record(entry())
    data = logged(lines)[0]
    assert "client" not in data
    assert "trace_id" not in data
    assert list(data) == [f for f in FIELDS if f not in ("client", "trace_id")]


def test_path_never_carries_the_query() -> None:
    lines: list[str] = []
    AccessLog(AccessLogConfig(), write=lines.append).record(entry(path="/login?token=s3cret&x=1"))
    assert logged(lines)[0]["path"] == "/login"
    assert "s3cret" not in lines[0]


def test_control_and_non_ascii_characters_stay_on_one_line() -> None:
    lines: list[str] = []
    AccessLog(AccessLogConfig(), write=lines.append).record(entry(path="/caf\u00e9/\nx"))
    assert lines[0].isascii()
    assert "\n" not in lines[0]
    assert logged(lines)[0]["path"] == "/caf\u00e9/\nx"


class RecordingStream(io.StringIO):
    """A text stream that remembers each write and counts flushes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, data: str) -> int:
        self.writes.append(data)
        return len(data)

    def flush(self) -> None:
        self.flushes += 1


def test_stdout_lines_are_batched_by_count() -> None:
    stream = RecordingStream()
    out = StdoutLines(max_lines=3, max_bytes=10_000, stream=stream)
    out("a")
    out("b")
    assert stream.writes == []
    assert out.pending == 2
    out("c")
    assert stream.writes == ["a\nb\nc\n"]
    assert stream.flushes == 1
    out("d")
    out.flush()
    out.flush()  # nothing pending: no empty write
    assert stream.writes == ["a\nb\nc\n", "d\n"]
    assert stream.flushes == 2
    assert out.pending == 0


def test_stdout_batches_stay_within_max_bytes_and_whole_lines() -> None:
    stream = RecordingStream()
    out = StdoutLines(max_lines=1000, max_bytes=100, stream=stream)
    lines = [f"line-{i:02d}-" + "x" * 20 for i in range(20)]  # 29 bytes with the newline
    for line in lines:
        out(line)
    out.flush()
    assert all(len(w) <= 100 and w.endswith("\n") for w in stream.writes)
    assert "".join(stream.writes).splitlines() == lines
    assert len(stream.writes) == 7  # 3 lines (87 bytes) per write


def test_a_line_longer_than_max_bytes_is_written_alone() -> None:
    stream = RecordingStream()
    out = StdoutLines(max_lines=1000, max_bytes=10, stream=stream)
    out("ab")
    out("x" * 50)
    assert stream.writes == ["ab\n", "x" * 50 + "\n"]


def test_default_flush_limits_keep_a_batch_within_pipe_buf() -> None:
    stream = RecordingStream()
    out = StdoutLines(stream=stream)
    for i in range(200):
        out(f"{i:04d}" + "y" * 295)  # 300 bytes with the newline
    assert out.max_bytes == 4096
    assert all(len(w) <= 4096 for w in stream.writes)
    assert len(stream.writes) == 200 // 13  # 13 lines of 300 bytes fit in 4096


def test_a_broken_stdout_drops_the_batch_without_raising() -> None:
    class Broken(RecordingStream):
        def write(self, data: str) -> int:
            super().write(data)
            raise BrokenPipeError(32, "Broken pipe")

    stream = Broken()
    out = StdoutLines(max_lines=2, stream=stream)
    out("lost-1")
    out("lost-2")
    assert stream.writes == ["lost-1\nlost-2\n"]
    assert out.pending == 0
    out("next")
    assert out.pending == 1


def test_default_writer_is_the_shared_buffer_on_the_current_stdout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    STDOUT.flush()
    capsys.readouterr()
    old = AccessLog(AccessLogConfig())
    new = AccessLog(AccessLogConfig(exclude_fields=("stages",)))
    old.record(entry(request_id="on-the-old-snapshot"))
    new.record(entry(request_id="on-the-new-snapshot"))
    assert capsys.readouterr().out == ""
    new.flush()  # the app flushes the current snapshot's log; the old one's line goes too
    ids = [json.loads(line)["request_id"] for line in capsys.readouterr().out.splitlines()]
    assert ids == ["on-the-old-snapshot", "on-the-new-snapshot"]


def test_flush_with_a_plain_callable_is_harmless() -> None:
    lines: list[str] = []
    log = AccessLog(AccessLogConfig(), write=lines.append)
    log.record(entry())
    log.flush()
    assert len(lines) == 1


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/a/b", "/a/b"),
        ("/shop;jsessionid=SECRET/cart", "/shop;…/cart"),
        ("/a;x=1/b;y=2", "/a;…/b;…"),
    ],
    ids=["plain", "session-id", "several"],
)
def test_path_parameters_are_never_logged(path: str, logged: str) -> None:
    assert loggable_path(path) == logged
