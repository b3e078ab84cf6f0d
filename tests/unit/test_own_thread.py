"""Blocking work on a thread that ends with it (gateway.runtime.threads)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.runtime.threads import in_own_thread


def _threads_named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


async def test_the_result_comes_back_and_the_thread_is_gone() -> None:
    ran_on: list[str] = []

    def work() -> int:
        ran_on.append(threading.current_thread().name)
        return 42

    assert await in_own_thread("test-work", work) == 42
    assert ran_on == ["test-work"]
    for thread in _threads_named("test-work"):
        thread.join(5)  # it returns right after handing the result over
    assert _threads_named("test-work") == []


async def test_an_exception_is_raised_in_the_awaiting_task() -> None:
    def fail() -> None:
        raise ValueError("bad config")

    with pytest.raises(ValueError, match="bad config"):
        await in_own_thread("test-fail", fail)


async def test_a_cancelled_wait_lets_the_call_finish_and_drops_its_result() -> None:
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(5)
        finished.set()
        return "late"

    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    task = asyncio.create_task(in_own_thread("test-slow", slow))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    assert await asyncio.to_thread(finished.wait, 5)
    # its result reaches a future already cancelled: dropped without an error on the loop
    for thread in _threads_named("test-slow"):
        await asyncio.to_thread(thread.join, 5)
    # the callback the thread scheduled is ahead of this one in the loop's queue
    after: asyncio.Future[None] = loop.create_future()
    loop.call_soon(after.set_result, None)
    await after
    assert errors == []
