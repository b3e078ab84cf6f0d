"""Rate limiting over real sockets: exact under concurrency, headers, keys, reloads."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.config_builder import gateway_yaml, route
from tests.support.gateway import port_of, running_gateway, write_config
from tests.support.raw import exchange

#: one request, then one a minute
ONE_A_MINUTE = {"rate": 1, "per": "1m", "burst": 1}


def _config(limit: Mapping[str, Any], **free_route: Any) -> str:
    """Routes / and /other share middleware `per-client` (a rate_limit of `limit`); route /free
    (with `free_route`'s options) has none."""
    return gateway_yaml(
        middlewares={"per-client": {"rate_limit": limit}},
        routes=[
            route("app", "internal:echo", pipeline=["per-client"]),
            route("other", "internal:echo", "/other", pipeline=["per-client"]),
            route("free", "internal:echo", "/free", **free_route),
        ],
    )


async def _get(port: int, path: str = "/x", headers: str = "") -> tuple[int, dict[str, str]]:
    response = await exchange(port, f"GET {path} HTTP/1.1\r\nHost: a\r\n{headers}\r\n".encode())
    return response.status, {n.lower(): v for n, v in response.headers}


async def test_exact_under_concurrency(tmp_path: Path) -> None:
    """20 clients hammer one bucket for 2 s; the count admitted is bounded both ways by the
    times the requests were sent and answered, read on the loop clock the gateway's memory store
    reads (the gateway runs on the test's loop): each take happened at a time t with
    sent <= t <= answered.

    From the first take t_F to any take t, a bucket that starts full earns burst + rate * (t -
    t_F) tokens, and never holds a negative count, so however the requests interleave:
        admitted <= burst + rate * (last answered - first sent).
    A refused take leaves less than one token.  So at least `burst` were admitted before the
    first refused take t_1 (tokens only ever left by being taken), and from t_1 to a later
    refused take t_2 the bucket, below one token at t_1, cannot reach its cap of 100 unless the
    clients pause for a second, so it is refilled at `rate` all along and more than
    rate * (t_2 - t_1) - 1 were admitted in between:
        admitted > burst + rate * (last refused sent - first refused answered) - 1.
    (Before the first refusal the bucket sits near its cap, where a pause of 10 ms between
    takes loses a token: the bound starts after it.)  The slack is a few tokens, while a
    refill 10 % too fast earns 20 more over the 2 s, and one 10 % too slow 20 fewer."""
    rate, burst, clients, seconds = 100, 100, 20, 2.0
    async with running_gateway(tmp_path, _config({"rate": rate, "burst": burst})) as gw:
        port = port_of(gw)
        loop = asyncio.get_running_loop()
        #: (sent, answered, status) of every request, on the loop's clock
        requests: list[tuple[float, float, int]] = []

        async def client(session: aiohttp.ClientSession, stop: float) -> None:
            while loop.time() < stop:
                sent = loop.time()
                async with session.get(f"http://127.0.0.1:{port}/x") as r:
                    await r.read()
                    requests.append((sent, loop.time(), r.status))

        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=connector) as session:
            stop = loop.time() + seconds
            await asyncio.gather(*(client(session, stop) for _ in range(clients)))
    assert {status for _, _, status in requests} == {200, 429}
    admitted = sum(1 for _, _, status in requests if status == 200)
    first_sent = min(sent for sent, _, _ in requests)
    last_answered = max(answered for _, answered, _ in requests)
    first_refused_answered = min(answered for _, answered, status in requests if status == 429)
    last_refused_sent = max(sent for sent, _, status in requests if status == 429)
    most = burst + rate * (last_answered - first_sent)
    least = burst + rate * (last_refused_sent - first_refused_answered) - 1
    assert least < admitted <= math.floor(most + 1e-6), (least, admitted, most)


async def test_headers_on_every_response_and_429(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, _config({"rate": 2, "per": "1m", "burst": 3})) as gw:
        port = port_of(gw)
        remaining = []
        for _ in range(3):
            status, headers = await _get(port)
            assert status == 200
            assert headers["ratelimit-policy"] == '"per-client";q=2;w=60'
            remaining.append(headers["ratelimit"])
        assert remaining[0].startswith('"per-client";r=2;t=')
        assert remaining[2].startswith('"per-client";r=0;t=')
        # three tokens to refill at two a minute: t is about 90 s
        assert 85 <= int(remaining[2].rsplit("=", 1)[1]) <= 90
        status, headers = await _get(port)
        assert status == 429
        assert 25 <= int(headers["retry-after"]) <= 30  # one token every 30 s
        assert headers["ratelimit"].startswith('"per-client";r=0;')
        assert headers["content-type"] == "application/problem+json"
        # a route without the stage carries no headers; one sharing the middleware shares buckets
        status, headers = await _get(port, "/free")
        assert status == 200
        assert "ratelimit" not in headers
        assert (await _get(port, "/other"))[0] == 429
        assert gw.admin is not None
        url = f"http://127.0.0.1:{gw.admin.port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as r:
            metrics = await r.text()
        assert 'gateway_rate_limited_total{route="app"} 1' in metrics
        assert 'gateway_rate_limited_total{route="other"} 1' in metrics


async def test_header_and_composite_keys(tmp_path: Path) -> None:
    limit = {"rate": 1, "per": "1m", "burst": 1, "key": ["client_ip", "header:X-Api-Key"]}
    async with running_gateway(tmp_path, _config(limit)) as gw:
        port = port_of(gw)
        assert (await _get(port, headers="X-Api-Key: a\r\n"))[0] == 200
        assert (await _get(port, headers="X-Api-Key: a\r\n"))[0] == 429
        assert (await _get(port, headers="x-api-key: b\r\n"))[0] == 200
        # without the header: one bucket shared by every request that leaves it out
        assert (await _get(port))[0] == 200
        assert (await _get(port))[0] == 429


async def test_state_survives_an_unrelated_reload_and_resets_on_change(tmp_path: Path) -> None:
    limit = {"rate": 1, "per": "1m", "burst": 2}
    async with running_gateway(tmp_path, _config(limit)) as gw:
        port = port_of(gw)
        assert [(await _get(port))[0] for _ in range(3)] == [200, 200, 429]
        write_config(tmp_path, _config(limit, max_body_bytes="1KiB"))  # an unrelated change
        result = await gw.reload()
        assert result["ok"], result
        assert result["changed"]
        assert (await _get(port))[0] == 429  # the same bucket, still empty
        write_config(tmp_path, _config({**limit, "burst": 3}))
        assert (await gw.reload())["ok"]
        assert [(await _get(port))[0] for _ in range(4)] == [200, 200, 200, 429]


async def test_inline_stages_have_their_own_buckets(tmp_path: Path) -> None:
    pipeline = [{"rate_limit": ONE_A_MINUTE}]
    config = gateway_yaml(
        routes=[
            route("one", "internal:echo", "/one", pipeline=pipeline),
            route("two", "internal:echo", "/two", pipeline=pipeline),
        ]
    )
    async with running_gateway(tmp_path, config) as gw:
        port = port_of(gw)
        assert (await _get(port, "/one"))[0] == 200
        assert (await _get(port, "/one"))[0] == 429
        status, headers = await _get(port, "/two")
        assert status == 200
        assert headers["ratelimit-policy"] == '"two";q=1;w=60'


async def test_refusal_is_a_problem_response(tmp_path: Path) -> None:
    body_seen: list[bytes] = []
    config = _config(ONE_A_MINUTE)
    async with running_gateway(tmp_path, config) as gw:
        port = port_of(gw)
        response = await exchange(port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        body_seen.append(response.body)
        response = await exchange(port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert response.status == 429
        problem = json.loads(response.body)
        assert problem["code"] == "rate_limited"
        assert problem["status"] == 429
    assert b'"route": "app"' in body_seen[0]
