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


async def _waited_body() -> tuple[RequestBody, float, asyncio.Future[bytes]]:
    """A body someone started waiting for (its rate clock starts then): (body, start, read)."""
    loop = asyncio.get_running_loop()
    body = RequestBody(loop, Producer(), limit=10**9, timeout=60)
    start = loop.time()
    reading = asyncio.ensure_future(body.read())
    await asyncio.sleep(0)  # the read is waiting now
    return body, start, reading


async def test_rate_is_judged_window_by_window() -> None:
    """1 KiB/s over 5 s windows: a burst pays for its own window only."""
    body, start, reading = await _waited_body()
    body.feed(b"b" * 70_000)
    await reading
    reading = asyncio.ensure_future(body.read())
    await asyncio.sleep(0)
    assert not body.check_rate(start + 4.9, 1024, 5.0)  # inside the grace period
    assert not body.check_rate(start + 5.1, 1024, 5.0)  # 70 kB in the first window: fine
    body.feed(b"b" * 100)
    assert body.check_rate(start + 10.3, 1024, 5.0)  # 100 bytes in the second: too slow
    with pytest.raises(RequestTimeout):
        await reading


async def test_a_steady_body_is_never_judged_slow() -> None:
    body, start, reading = await _waited_body()
    for second in range(1, 30):
        body.feed(b"s" * 2048)
        assert not body.check_rate(start + second, 1024, 5.0)
    reading.cancel()


async def test_time_the_gateway_held_the_client_back_does_not_count() -> None:
    loop = asyncio.get_running_loop()
    producer = Producer()
    body = RequestBody(loop, producer, limit=10**9, timeout=60)
    start = loop.time()
    reading = asyncio.ensure_future(body.read())
    await asyncio.sleep(0)
    body.feed(b"first")
    await reading  # nobody reads on: the next bytes stay buffered
    body.feed(b"p" * (BODY_HIGH_WATER + 1))  # paused by the gateway from here
    assert producer.paused
    # a minute later, still paused: the client was not the one waiting
    assert not body.check_rate(start + 60, 1024, 5.0)
