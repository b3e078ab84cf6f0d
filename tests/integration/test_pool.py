"""gateway.upstream.pool.EndpointPool over real sockets: what a request waiting for a connection
is handed is never lost, even when the request goes away at that moment."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from gateway.upstream.connection import UpstreamConnection
from gateway.upstream.pool import EndpointPool
from tests.support.faulty import faulty_upstreams
from tests.support.process import async_wait_until


class _Unobserved:
    def on_connect(self, seconds: float) -> None:
        pass

    def on_handshake(self, seconds: float) -> None:
        pass

    def on_acquire(self, reused: bool) -> None:
        pass

    def on_evict(self) -> None:
        pass


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
        pool = EndpointPool(
            asyncio.get_running_loop(),
            "127.0.0.1",
            a.port,
            max_connections=1,
            idle_timeout=5.0,
            connect_timeout=1.0,
            observer=_Unobserved(),
            queue_timeout=5.0,
        )
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
