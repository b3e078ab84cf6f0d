"""Write flow control shared by both ends of the proxy: waiting for a transport to drain.

asyncio calls a protocol's `pause_writing` when its transport's buffer passes the high-water
mark and `resume_writing` when it falls back.  A coroutine that writes (the server answering a
client, the upstream connection sending a request body) must then wait before writing more:
`Drain` is that wait — one waiter at a time, woken by `resume_writing`, or failed (or woken) when
the connection is lost, so nobody waits for a socket that is gone.
"""

from __future__ import annotations

import asyncio
from typing import final


@final
class Drain:
    __slots__ = ("_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    def wait(self) -> asyncio.Future[None]:
        """A future that `release` (or `fail`) resolves; await it while writing is paused."""
        waiter = self._loop.create_future()
        self._waiter = waiter
        return waiter

    def release(self) -> None:
        """Writing may go on (resume_writing), or the waiter should look again (connection lost)."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def fail(self, exc: BaseException) -> None:
        """The connection is gone: the waiter gets `exc` (retrieved even if nobody awaits it)."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(exc)
                waiter.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def not_connected(data: bytes) -> object:
    """A protocol's bound `transport.write` before `connection_made` gives it a transport."""
    raise ConnectionError("no transport to write to yet")
