"""Load balancing over real sockets: least_request steers requests away from a slow endpoint."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.faulty import faulty_upstreams
from tests.support.gateway import port_of, running_gateway

#: the issue's measurement: 6 clients sharing 48 requests, one endpoint slow to answer (300 ms
#: there; 1 s here, so that a loaded machine still serves the other requests meanwhile)
CLIENTS = 6
REQUESTS = 48
SLOW_SECONDS = 1.0
#: how many of the 48 the slow endpoint may get (see the test's docstring)
SLOW_SHARE_BOUND = 6


async def test_least_request_sends_few_requests_to_a_slow_endpoint(tmp_path: Path) -> None:
    """Two distinct endpoints compared at each pick: the slow one gets a request only when it
    has no more in flight than the fast one.  That is about half the clients' first requests
    (both endpoints idle, in-flight counts evened out: 3, or 4 after a 3-3 tie), and then none,
    since the clients left on the fast endpoint take the other 44 requests while the slow one
    holds its few.  Measured with a 300 ms endpoint: 3 or 4 in 150 runs but one (5).  With the
    draws made with replacement a quarter of the picks compared the slow endpoint with itself and
    took it however loaded it was, so each request on the fast endpoint had a 1-in-4 chance of
    joining the slow queue: 8 to 21 in 140 runs, mostly 11-17 (the issue's 15-17).

    The bound assumes the machine serves those 44 requests within the slow endpoint's second: a
    machine too loaded for that gives the slow endpoint another round each second."""
    async with faulty_upstreams("slow", "fast") as [slow, fast]:
        slow.mode = f"slow:{SLOW_SECONDS}"
        config = gateway_yaml(
            upstreams={"app": upstream_to(slow.url, fast.url, balance="least_request")},
            routes=[route("app", "app")],
        )
        async with running_gateway(tmp_path, config) as gw:
            url = f"http://127.0.0.1:{port_of(gw)}/x"
            left = REQUESTS
            statuses: list[int] = []

            async def client() -> None:
                nonlocal left
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
                    while left > 0:
                        left -= 1
                        async with s.get(url) as response:
                            await response.read()
                            statuses.append(response.status)

            await asyncio.gather(*(client() for _ in range(CLIENTS)))
    assert statuses == [200] * REQUESTS
    assert slow.total + fast.total == REQUESTS
    assert slow.total <= SLOW_SHARE_BOUND, f"{slow.total} of {REQUESTS} went to the slow endpoint"
