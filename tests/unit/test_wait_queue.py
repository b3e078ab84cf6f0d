"""gateway.upstream.pool.WaitQueue: requests waiting for a pooled connection take turns, by
client."""

from __future__ import annotations

import asyncio

from gateway.upstream.connection import UpstreamConnection
from gateway.upstream.pool import WaitQueue

Waiter = asyncio.Future[UpstreamConnection | None]


async def test_clients_take_turns() -> None:
    loop = asyncio.get_running_loop()
    queue = WaitQueue()
    names: dict[int, str] = {}
    for client, count in (("a", 4), ("b", 1), ("c", 2)):
        for i in range(count):
            waiter: Waiter = loop.create_future()
            names[id(waiter)] = f"{client}{i}"
            queue.add(client, waiter)
    order = []
    while (waiter := queue.pop()) is not None:
        order.append(names[id(waiter)])
        waiter.set_result(None)
    assert order == ["a0", "b0", "c0", "a1", "c1", "a2", "a3"]
    assert queue.count == 0


async def test_waiters_that_gave_up_are_skipped() -> None:
    loop = asyncio.get_running_loop()
    queue = WaitQueue()
    gone: Waiter = loop.create_future()
    kept: Waiter = loop.create_future()
    queue.add("a", gone)
    queue.add("a", kept)
    gone.cancel()
    assert queue.pop() is kept
    assert queue.pop() is None
    assert queue.count == 0


async def test_a_client_whose_waiters_all_gave_up_loses_its_turn() -> None:
    loop = asyncio.get_running_loop()
    queue = WaitQueue()
    gone: Waiter = loop.create_future()
    other: Waiter = loop.create_future()
    queue.add("a", gone)
    queue.add("b", other)
    gone.cancel()
    assert queue.pop() is other
    later: Waiter = loop.create_future()
    queue.add("a", later)  # a new turn for "a"
    assert queue.pop() is later
