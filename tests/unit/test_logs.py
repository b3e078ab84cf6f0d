"""gateway.observability.logs: JSON lines, extra fields, tracebacks, setup, secret hygiene."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.config.model import TracingConfig
from gateway.observability.access_log import FIELDS
from gateway.observability.exposition import Registry
from gateway.observability.logs import (
    JsonStdoutHandler,
    redact_headers,
    rfc3339,
    setup_logging,
)
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.request_trace import CURRENT_TRACE, TraceSlot, start_trace
from gateway.observability.tracing import Tracer

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


@pytest.fixture
def root() -> Iterator[logging.Logger]:
    """The root logger, restored after the test (setup_logging changes process-wide state)."""
    logger = logging.getLogger()
    handlers, level = list(logger.handlers), logger.level
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_a_record_is_one_json_line(
    root: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging()
    logging.getLogger("gateway.test").warning("upstream %s answered %d", "users", 503)
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    data = json.loads(out)
    assert data.pop("time") is not None
    assert data == {
        "level": "WARNING",
        "type": "app",
        "logger": "gateway.test",
        "message": "upstream users answered 503",
    }


def test_time_is_rfc3339_utc_with_milliseconds(
    root: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging()
    logging.getLogger("gateway.test").info("hello")
    assert TIME.match(lines(capsys)[0]["time"])


def test_extra_fields_are_added_but_do_not_replace_the_fixed_ones(
    root: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging()

    class Opaque:
        def __str__(self) -> str:
            return "opaque-object"

    logging.getLogger("gateway.reload").error(
        "reload rejected",
        extra={"path": "routes[2].match.path", "count": 3, "level": "fake", "thing": Opaque()},
    )
    data = lines(capsys)[0]
    assert data["path"] == "routes[2].match.path"
    assert data["count"] == 3
    assert data["level"] == "ERROR"
    assert data["thing"] == "opaque-object"
    assert data["message"] == "reload rejected"


def test_extra_fields_named_like_credentials_are_redacted(
    root: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging()
    logging.getLogger("gateway.jwt").info(
        "token checked",
        extra={"authorization": "Bearer abc", "access_token": "abc", "Api_Key": "k", "route": "r"},
    )
    out = capsys.readouterr().out
    data = json.loads(out)
    assert data["authorization"] == "[redacted]"
    assert data["access_token"] == "[redacted]"
    assert data["Api_Key"] == "[redacted]"
    assert data["route"] == "r"
    assert "abc" not in out


def test_exception_traceback_goes_in_exc(
    root: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging()
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("gateway.server").exception("handler failed")
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # the multi-line traceback is escaped inside the one line
    data = json.loads(out)
    assert data["message"] == "handler failed"
    assert data["exc"].startswith("Traceback (most recent call last):")
    assert data["exc"].endswith("ValueError: boom")


def test_no_exc_field_without_exc_info(
    root: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging()
    logging.getLogger("gateway.test").error("plain")
    assert "exc" not in lines(capsys)[0]


def test_stack_info_goes_in_stack(root: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging()
    logging.getLogger("gateway.test").warning("where", stack_info=True)
    assert lines(capsys)[0]["stack"].startswith("Stack (most recent call last):")


def test_setup_is_idempotent(root: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging()
    setup_logging()
    assert sum(isinstance(h, JsonStdoutHandler) for h in root.handlers) == 1
    logging.getLogger("gateway.test").warning("once")
    assert [line["message"] for line in lines(capsys)] == ["once"]


def test_level_is_applied_and_can_be_changed(
    root: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("warning")
    log = logging.getLogger("gateway.test")
    log.info("hidden")
    log.warning("shown")
    setup_logging("DEBUG")
    log.debug("now shown")
    assert [line["message"] for line in lines(capsys)] == ["shown", "now shown"]
    assert sum(isinstance(h, JsonStdoutHandler) for h in root.handlers) == 1


def test_unknown_level_is_rejected(root: logging.Logger) -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("LOUD")


def test_redact_headers_hides_credentials_only() -> None:
    headers = [
        ("Authorization", "Bearer secret-1"),
        ("proxy-authorization", "Basic secret-2"),
        ("COOKIE", "sid=secret-3"),
        ("Set-Cookie", "sid=secret-4"),
        ("X-Api-Key", "secret-5"),
        ("Idempotency-Key", "secret-6"),
        ("Content-Type", "application/json"),
        ("X-Request-Id", "abc"),
    ]
    redacted = redact_headers(headers)
    assert [name for name, _ in redacted] == [name for name, _ in headers]
    assert [value for _, value in redacted] == ["[redacted]"] * 6 + ["application/json", "abc"]


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1_700_000_000.123, "2023-11-14T22:13:20.123Z"),
        (1_700_000_000.9996, "2023-11-14T22:13:21.000Z"),  # rounds into the next second
        (951_782_400.5, "2000-02-29T00:00:00.500Z"),
    ],
)
def test_rfc3339(epoch: float, expected: str) -> None:
    assert rfc3339(epoch) == expected


def test_rfc3339_cache_follows_the_second() -> None:
    assert rfc3339(1_700_000_000.001) == "2023-11-14T22:13:20.001Z"
    assert rfc3339(1_700_000_061.002) == "2023-11-14T22:14:21.002Z"
    assert rfc3339(1_700_000_000.003) == "2023-11-14T22:13:20.003Z"


def test_a_line_written_while_a_traced_request_is_handled_names_its_trace(
    root: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging()
    loop = asyncio.new_event_loop()
    tracer = Tracer(TracingConfig(), GatewayMetrics(Registry()), loop)
    loop.close()
    parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    trace = start_trace(tracer, parent, None, b"")
    slot = TraceSlot()
    token = CURRENT_TRACE.set(slot)
    try:
        logging.getLogger("gateway.test").info("before")
        slot.trace = trace
        logging.getLogger("gateway.test").warning("during")
        slot.trace = None
        logging.getLogger("gateway.test").info("after")
    finally:
        CURRENT_TRACE.reset(token)
    before, during, after = lines(capsys)
    assert "trace_id" not in before
    assert "trace_id" not in after
    assert during["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert during["span_id"] == trace.span_id
    # app lines and access lines begin with the same fields
    assert list(during)[:3] == ["time", "level", "type"]
    assert list(FIELDS)[:3] == ["time", "level", "type"]
