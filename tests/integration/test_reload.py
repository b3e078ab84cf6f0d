"""Reload: validated whole, swapped in one step, pools kept, in-flight requests unharmed.

A request keeps the snapshot it began on, and with it the upstream it was routed to: when a
reload retires that upstream, the request (and its retries) finish on the retired pools, which
then close every connection they opened.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from tests.integration.conftest import Seen, basic_config
from tests.support.config_builder import gateway_yaml, listener, route, upstream_to
from tests.support.faulty import FaultyUpstream, faulty_upstreams
from tests.support.gateway import (
    in_flight_requests,
    pooled_connections,
    port_of,
    running_gateway,
    write_config,
)
from tests.support.process import async_wait_until
from tests.support.raw import close_writer, exchange, open_raw, read_response


async def test_invalid_config_is_rejected_whole(
    tmp_path: Path, gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    port = port_of(gw)
    version = gw.snapshot.version
    write_config(
        tmp_path, "routes:\n  - name: x\n    match: {pth: /}\n    upstream: internal:echo\n"
    )
    result = await gw.reload()
    assert result["ok"] is False
    assert "routes[0].match.pth" in result["error"]
    assert gw.snapshot.version == version
    assert gw.config_info()["last_reload"]["ok"] is False
    assert (await exchange(port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200


async def test_listener_change_needs_restart(
    tmp_path: Path, gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    server, _ = upstream
    write_config(tmp_path, basic_config(server.port or 0, listeners=[listener(1)]))
    result = await gw.reload()
    assert result["ok"] is False
    assert "restart" in result["error"]


async def test_unchanged_upstream_keeps_its_pool_and_in_flight_requests_finish(
    tmp_path: Path, gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    server, seen = upstream
    port = port_of(gw)
    assert (await exchange(port, b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200
    pool_before = gw.snapshot.upstreams["app"]
    in_flight = asyncio.ensure_future(
        exchange(port, b"GET /slow?s=0.5 HTTP/1.1\r\nHost: a\r\n\r\n")
    )
    await async_wait_until(lambda: in_flight_requests(gw) == 1, what="request in flight")
    new_route = route("added", "internal:echo", match={"path": "/added-route"})
    write_config(tmp_path, basic_config(server.port or 0, more_routes=[new_route]))
    result = await gw.reload()
    assert result["ok"] is True, result
    assert result["changed"] is True
    assert gw.snapshot.upstreams["app"] is pool_before
    response = await in_flight
    assert response.status == 200
    assert response.body == b"late"
    added = await exchange(port, b"GET /added-route HTTP/1.1\r\nHost: a\r\n\r\n")
    assert added.status == 200
    assert b'"route": "added"' in added.body
    assert (await exchange(port, b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200
    # over the wire: every request, before, across and after the reload, came on the one TCP
    # connection the warming request opened (the same peer port), which is still open
    assert [r["path"] for r in seen.requests] == ["/warm", "/again"]
    warm, again = (r["peer_port"] for r in seen.requests)
    [slow] = seen.slow_peer_ports
    assert slow == warm
    assert again == warm
    assert _open_peer_ports(server) == {warm}


async def test_changed_upstream_gets_a_new_pool(
    tmp_path: Path, gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    server, seen = upstream
    port = port_of(gw)
    assert (await exchange(port, b"GET /before HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200
    before = gw.snapshot.upstreams["app"]
    write_config(tmp_path, basic_config(server.port or 0, response_header="3s"))
    assert (await gw.reload())["ok"] is True
    assert gw.snapshot.upstreams["app"] is not before
    assert (await exchange(port, b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200
    # over the wire: the new pool opened a connection of its own, and the retired pool closed
    # the idle one it held
    old_port, new_port = (r["peer_port"] for r in seen.requests)
    assert new_port != old_port
    await async_wait_until(
        lambda: _open_peer_ports(server) == {new_port}, within=5, what="old connection closed"
    )


def _open_peer_ports(server: TestServer) -> set[int]:
    """The peer ports of the connections open to `server` now, as the server sees them."""
    assert server.handler is not None
    ports = set()
    for protocol in server.handler.connections:
        transport = protocol.transport
        if transport is not None:
            ports.add(transport.get_extra_info("peername")[1])
    return ports


# -- a reload with one invalid route is refused whole ----------------------------------------

#: route /three of the new config, broken three ways, and the YAML path its error names
_INVALID_THREE = [
    pytest.param(route("three", "nope", "/three"), "routes[2].upstream", id="unknown-upstream"),
    pytest.param(
        route("three", "a", "/three", pipeline=[{"rate_limit": {"rate": -1}}]),
        "routes[2].pipeline[0].rate_limit.rate",
        id="invalid-stage",
    ),
    pytest.param(
        route("three", "a", match={"pth": "/three"}), "routes[2].match.pth", id="unknown-match-key"
    ),
]


@pytest.mark.parametrize(("invalid_route", "yaml_path"), _INVALID_THREE)
async def test_a_reload_with_one_invalid_route_changes_nothing(
    tmp_path: Path, invalid_route: dict[str, Any], yaml_path: str
) -> None:
    """SPEC: a reload never half-applies.  The new config moves /one to upstream b, drops /two,
    adds /four and breaks /three: it is refused whole, every route of the old config answers
    as before, and /admin/config reports the error at its YAML path."""
    async with faulty_upstreams("a", "b") as [a, b]:
        upstreams = {"a": upstream_to(a.url), "b": upstream_to(b.url)}
        old = gateway_yaml(
            upstreams=upstreams,
            routes=[
                route("one", "a", "/one"),
                route("two", "b", "/two"),
                route("three", "a", "/three"),
            ],
        )
        new = gateway_yaml(
            upstreams=upstreams,
            routes=[route("one", "b", "/one"), route("four", "a", "/four"), invalid_route],
        )
        async with running_gateway(tmp_path, old) as gw:
            port = port_of(gw)
            before = await _answers(port)
            assert before == {
                "/one": (200, "a"),
                "/two": (200, "b"),
                "/three": (200, "a"),
                "/four": (404, None),
            }
            write_config(tmp_path, new)
            assert gw.admin is not None
            admin = f"http://127.0.0.1:{gw.admin.port}"
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{admin}/admin/reload") as r:
                    assert r.status == 422
                    result = await r.json()
                async with session.get(f"{admin}/admin/config") as r:
                    last = (await r.json())["last_reload"]
            assert result["ok"] is False
            assert last["ok"] is False
            assert f"{yaml_path}:" in last["error"], last["error"]
            assert await _answers(port) == before


async def _answers(port: int) -> dict[str, tuple[int, str | None]]:
    """(status, the answering endpoint) of a GET to each route's path."""
    answers = {}
    for path in ("/one", "/two", "/three", "/four"):
        response = await exchange(port, f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        answers[path] = (response.status, response.header("x-endpoint"))
    return answers


# -- a reload that changes or removes the upstream a request is on -------------------------------


def _one_route(app: Mapping[str, Any], pipeline: Sequence[Mapping[str, Any]] = ()) -> str:
    """Every path to upstream `app` (see `_app`) through `pipeline`."""
    return gateway_yaml(upstreams={"app": app}, routes=[route("app", "app", pipeline=pipeline)])


def _app(*servers: FaultyUpstream, **options: Any) -> dict[str, Any]:
    return upstream_to(*(s.url for s in servers), **options)


async def _reload(gw: Gateway, tmp_path: Path, text: str) -> None:
    write_config(tmp_path, text)
    result = await gw.reload()
    assert result["ok"] is True, result


async def _retired_pools_closed(gw: Gateway, *servers: FaultyUpstream) -> None:
    """No retired upstream still holds a connection, and each server has exactly the connections
    the live pools hold: whatever a retired pool opened was closed."""
    await async_wait_until(lambda: not gw.shared.retiring, within=5, what="retired pools drained")

    def settled() -> bool:
        pooled = pooled_connections(gw)
        return all(s.open_connections == pooled[s.address] for s in servers)

    await async_wait_until(settled, within=5, what="upstream connections closed")


async def test_a_request_whose_body_arrives_after_the_swap_finishes_on_the_retired_pool(
    tmp_path: Path,
) -> None:
    async with (
        faulty_upstreams("a", "b") as [a, b],
        running_gateway(tmp_path, _one_route(_app(a))) as gw,
    ):
        reader, writer = await open_raw(port_of(gw))
        try:
            # the route (and its upstream) is chosen on the head; the body is read before a
            # pooled connection is taken
            writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
            await async_wait_until(lambda: in_flight_requests(gw) == 1, what="request in flight")
            await _reload(gw, tmp_path, _one_route(_app(b)))
            writer.write(b"world")
            response = await asyncio.wait_for(read_response(reader), 5)
        finally:
            await close_writer(writer)
        assert (response.status, response.header("x-endpoint")) == (200, "a"), response.body
        assert response.body == b"helloworld"
        assert (await exchange(port_of(gw), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")).header(
            "x-endpoint"
        ) == "b"
        await _retired_pools_closed(gw, a, b)
        assert a.open_connections == 0


async def test_a_request_waiting_for_a_pooled_connection_is_served_by_the_retired_pool(
    tmp_path: Path,
) -> None:
    one_connection = {"pool": {"max_connections": 1, "queue_timeout": "5s"}}
    async with (
        faulty_upstreams("a", "b") as [a, b],
        running_gateway(tmp_path, _one_route(_app(a, **one_connection))) as gw,
    ):
        port = port_of(gw)
        gate = a.held["first"] = asyncio.Event()
        first = asyncio.ensure_future(
            exchange(port, b"GET /1 HTTP/1.1\r\nHost: a\r\nX-Test-Id: first\r\n\r\n")
        )
        await async_wait_until(lambda: a.total == 1, what="first request at the upstream")
        second = asyncio.ensure_future(exchange(port, b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"))
        pool = gw.snapshot.upstreams["app"].endpoints[0].pool
        await async_wait_until(lambda: pool.waiting == 1, what="second request waiting")
        await _reload(gw, tmp_path, _one_route(_app(b, **one_connection)))
        gate.set()
        answers = [await first, await second]
        assert [(r.status, r.header("x-endpoint")) for r in answers] == [(200, "a"), (200, "a")]
        assert a.total == 2
        await _retired_pools_closed(gw, a, b)
        assert a.open_connections == 0


async def test_a_retry_after_the_swap_goes_to_another_endpoint_of_the_retired_upstream(
    tmp_path: Path,
) -> None:
    ejecting = {"outlier_detection": {"consecutive_failures": 1, "ejection": "10s"}}
    retry = [{"retry": {"attempts": 2}}]
    async with (
        faulty_upstreams("a", "b") as servers,
        running_gateway(tmp_path, _one_route(_app(*servers, **ejecting), retry)) as gw,
    ):
        gate = asyncio.Event()
        for server in servers:
            server.held["r"] = gate
        request = asyncio.ensure_future(
            exchange(port_of(gw), b"GET / HTTP/1.1\r\nHost: a\r\nX-Test-Id: r\r\n\r\n")
        )
        await async_wait_until(lambda: sum(s.total for s in servers) == 1, what="first try")
        failing, other = servers if servers[0].total else servers[::-1]
        failing.mode = "status:503"
        # the same endpoints, another timeout: a new upstream, and the old one retired
        changed = {**ejecting, "timeouts": {"response_header": "3s"}}
        await _reload(gw, tmp_path, _one_route(_app(*servers, **changed), retry))
        gate.set()
        response = await request
        assert (response.status, response.header("x-endpoint")) == (200, other.name)
        # the retired upstream's outcomes never reach the live upstream's state or gauges
        live = gw.snapshot.upstreams["app"]
        assert not any(e.ejected for e in live.endpoints)
        up = gw.metrics.upstream_endpoint_up.labels("app", failing.address).value
        assert up == 1
        await _retired_pools_closed(gw, *servers)


# -- the reload storm --------------------------------------------------------------------------

#: how long the config keeps changing, and how often
STORM_SECONDS = 10.0
STORM_PERIOD = 0.3


def _a_pipeline(step: int) -> list[dict[str, Any]]:
    """The pipeline route /a takes at `step`: a stage added, changed, removed, in turn."""
    before: list[list[dict[str, Any]]] = [
        [],
        [{"retry": {"attempts": 2}}],
        [{"rate_limit": {"rate": 100000, "burst": 100000}}],
    ]
    return [*before[step % 3], {"headers": {"response": {"set": {"X-Step": str(step)}}}}]


def _storm_config(step: int, servers: Sequence[FaultyUpstream]) -> str:
    """The storm's config number `step`: upstream `alpha` moves between the servers every other
    step (so it is kept, warm, by the step in between), route /b's upstream is `beta` and
    `gamma` in turn (the other one removed), route /a's stages change every step, and both
    routes are renamed every step."""
    turn = step // 2
    balance = {"balance": "least_request"} if turn % 2 else {}
    alpha = _app(servers[turn % 3], servers[(turn + 1) % 3], **balance)
    b_name = "beta" if step % 2 else "gamma"
    b_pipeline: list[dict[str, Any]] = [{"circuit_breaker": {}}] if turn % 2 else []
    return gateway_yaml(
        upstreams={"alpha": alpha, b_name: _app(servers[(step + 2) % 3])},
        routes=[
            route(f"a-{step}", "alpha", "/a", pipeline=_a_pipeline(step)),
            route(f"b-{step}", b_name, "/b", pipeline=b_pipeline),
        ],
    )


def _save(path: Path, text: str) -> None:
    """Save the way editors do: a temporary file renamed over the original (never half-read)."""
    temporary = path.with_name(f".{path.name}.swp")
    temporary.write_text(text)
    os.replace(temporary, path)


async def test_a_reload_storm_under_load_fails_no_request_and_leaks_no_connection(
    tmp_path: Path,
) -> None:
    """The file watcher's reload path (the gateway in-process, watching its config as `gateway
    run` does), a new config every 0.3 s for 10 s, 8 clients requesting all along."""
    async with (
        faulty_upstreams("s0", "s1", "s2") as servers,
        running_gateway(tmp_path, _storm_config(0, servers), watch=True) as gw,
    ):
        base = f"http://127.0.0.1:{port_of(gw)}"
        stop = asyncio.Event()
        outcomes: Counter[int | str] = Counter()

        async def client(index: int) -> None:
            # a request the gateway never answers counts as a failure, not a hung test
            timeout = aiohttp.ClientTimeout(total=5)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                paths = ("/a", "/b") if index % 2 else ("/b", "/a")
                while not stop.is_set():
                    for path in paths:
                        try:
                            async with session.get(base + path) as response:
                                await response.read()
                                outcomes[response.status] += 1
                        except (aiohttp.ClientError, TimeoutError) as exc:
                            outcomes[type(exc).__name__] += 1

        clients = [asyncio.create_task(client(i)) for i in range(8)]
        loop = asyncio.get_running_loop()
        try:
            started = loop.time()
            step = 0
            while loop.time() - started < STORM_SECONDS:
                step += 1
                _save(tmp_path / "gateway.yaml", _storm_config(step, servers))
                await asyncio.sleep(STORM_PERIOD)  # the storm's pace: nothing is waited for
            last = f"a-{step}"
            await async_wait_until(
                lambda: gw.snapshot.routes[0].name == last, within=5, what="the last config"
            )
        finally:
            stop.set()
            await asyncio.gather(*clients)
        reloads = gw.metrics.config_reloads_total
        served = outcomes[200]
        assert outcomes == Counter({200: served}), outcomes
        assert served >= 500
        assert reloads.labels("failure").value == 0
        assert reloads.labels("success").value >= step // 2, f"{step} configs written"
        await _retired_pools_closed(gw, *servers)
