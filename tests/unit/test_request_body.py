"""RequestBody: bounded buffering with back-pressure, limits and read timeouts."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import PayloadTooLarge, RequestTimeout
from gateway.http.messages import BODY_HIGH_WATER, RequestBody


class Producer:
    def __init__(self) -> None:
        self.paused = False
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.paused = True
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.paused = False
        self.calls.append("resume")


async def test_pauses_above_high_water_and_resumes_when_drained() -> None:
    producer = Producer()
    body = RequestBody(asyncio.get_running_loop(), producer, limit=10**9, timeout=5)
    chunk = b"x" * 65536
    for _ in range(BODY_HIGH_WATER // len(chunk) + 1):
        body.feed(chunk)
    assert producer.paused
    while producer.paused:
        assert await body.read() == chunk
    assert producer.calls == ["pause", "resume"]


async def test_read_returns_empty_at_eof_and_take_all_replays() -> None:
    body = RequestBody(asyncio.get_running_loop(), Producer(), limit=100, timeout=5)
    body.feed(b"ab")
    body.feed(b"cd")
    body.feed_eof()
    assert body.is_complete
    assert body.take_all() == b"abcd"
    assert body.take_all() == b"abcd"


async def test_limit_fails_the_reader() -> None:
    body = RequestBody(asyncio.get_running_loop(), Producer(), limit=3, timeout=5)
    body.feed(b"abcd")
    with pytest.raises(PayloadTooLarge):
        await body.read()
    assert not body.is_complete


async def test_a_stalled_body_times_out() -> None:
    body = RequestBody(asyncio.get_running_loop(), Producer(), limit=100, timeout=0.05)
    body.feed(b"a")
    assert await body.read() == b"a"
    with pytest.raises(RequestTimeout):
        await body.read()


async def test_first_read_triggers_continue_once() -> None:
    body = RequestBody(asyncio.get_running_loop(), Producer(), limit=100, timeout=5)
    sent: list[bool] = []
    body.on_first_read = lambda: sent.append(True)
    reader = asyncio.ensure_future(body.read())
    await asyncio.sleep(0)
    body.feed(b"x")
    assert await reader == b"x"
    body.feed_eof()
    assert await body.read() == b""
    assert sent == [True]
