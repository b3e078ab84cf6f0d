"""gateway.upstream.pool.EndpointPool over real sockets: what a request waiting for a connection
is handed is never lost, even when the request goes away at that moment."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from gateway.upstream.connection import UpstreamConnection
from gateway.upstream.pool import EndpointPool, PoolObserver
from tests.support.faulty import faulty_upstreams
from tests.support.process import async_wait_until


def _pool(
    port: int, *, max_connections: int, idle_timeout: float, **options: float
) -> EndpointPool:
    """A pool to `port` on 127.0.0.1 that observes nothing, connecting within a second."""
    return EndpointPool(
        asyncio.get_running_loop(),
        "127.0.0.1",
        port,
        max_connections=max_connections,
        idle_timeout=idle_timeout,
        connect_timeout=1.0,
        observer=PoolObserver(),
        **options,
    )


def _hand_over_the_connection(pool: EndpointPool, conn: UpstreamConnection) -> None:
    conn.in_use = False  # as UpstreamConnection does before it releases itself
    pool.release(conn)


def _hand_over_its_slot(pool: EndpointPool, conn: UpstreamConnection) -> None:
    # a tunnel leaves the pool, as UpstreamConnection.start_tunnel does: its slot goes to the
    # waiter at once, and the connection is no longer the pool's
    pool.detach(conn)
    conn.detached = True
    conn.close()


@pytest.mark.parametrize(
    "hand_over",
    [_hand_over_the_connection, _hand_over_its_slot],
    ids=["a-connection", "a-free-slot"],
)
async def test_a_waiter_cancelled_as_it_is_served_gives_back_what_it_was_handed(
    hand_over: Callable[[EndpointPool, UpstreamConnection], None],
) -> None:
    async with faulty_upstreams("a") as [a]:
        pool = _pool(a.port, max_connections=1, idle_timeout=5.0, queue_timeout=5.0)
        try:
            conn = await pool.acquire()
            waiting = asyncio.ensure_future(pool.acquire())
            await async_wait_until(lambda: pool.waiting == 1, what="a request waiting")
            hand_over(pool, conn)
            # its client went away in the same turn of the loop: it never runs again
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            # the one slot is usable again: a request gets a connection, not upstream_busy
            again = await pool.acquire(queue_timeout=0.2)
            assert pool.opened == 1
            again.in_use = False
            pool.release(again)
        finally:
            pool.close()


async def test_idle_connections_go_newest_first_and_the_sweeper_closes_the_oldest() -> None:
    async with faulty_upstreams("a") as [a]:
        pool = _pool(a.port, max_connections=3, idle_timeout=10.0)
        now = 100.0
        pool.loop_time = lambda: now  # the pool's clock, moved by hand
        try:
            conns = [await pool.acquire() for _ in range(3)]
            for i, conn in enumerate(conns):  # idle since 100, 101 and 102
                now = 100.0 + i
                _hand_over_the_connection(pool, conn)
            newest = pool.take_idle()
            assert newest is conns[2]  # the warmest
            _hand_over_the_connection(pool, newest)  # idle since 102 again
            now = 111.5  # the two oldest idle for more than 10 s, the newest for 9.5 s
            pool._sweep()
            await async_wait_until(
                lambda: conns[0].is_closed and conns[1].is_closed, what="the two oldest closed"
            )
            assert not conns[2].is_closed
            assert pool.idle_count == 1
            assert pool.take_idle() is conns[2]
            assert pool.take_idle() is None
            _hand_over_the_connection(pool, conns[2])
        finally:
            pool.close()
        assert pool.idle_count == 0
        assert conns[2].is_closed
