"""Blocking work off the event loop, on a thread that ends with it.

The serving process is kept single-threaded while it serves (README, "One thread"): once a
process has a second thread, the kernel takes and drops a reference on the file behind every
system call's descriptor (a single-threaded process skips that), and the loop's own locks stop
being uncontended.  Measured on the operator route: 20.8 µs of CPU a request with the threads
that `asyncio.to_thread` (its executor's threads idle until the process exits), watchfiles'
notifier and libuv's resolver pool leave behind, 19.9 µs without them.

So a config load or a tracer's last export runs here on a thread of its own, which exits when
the call returns, instead of on the default executor.  Not for the request path: a thread is
started per call (tens of microseconds), which a reload or a shutdown can afford.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def in_own_thread(name: str, call: Callable[[], T]) -> T:
    """`call()` on a new thread named `name`; its result or exception, once it returns.  When
    the awaiting task is cancelled the call still runs to its end (a thread cannot be
    interrupted), and what it returns is dropped."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle_result(result: T) -> None:
        if not done.done():
            done.set_result(result)

    def settle_error(error: BaseException) -> None:
        if not done.done():
            done.set_exception(error)

    def run() -> None:
        try:
            result = call()
        except BaseException as exc:  # handed to the awaiting task, whatever it is
            _settle_on(loop, settle_error, exc)
        else:
            _settle_on(loop, settle_result, result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done


def _settle_on(loop: asyncio.AbstractEventLoop, settle: Callable[[T], None], value: T) -> None:
    # RuntimeError: the loop closed while the call ran, and nobody waits for it any more
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle, value)
