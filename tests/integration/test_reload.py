"""Reload: validated whole, swapped in one step, pools kept, in-flight requests unharmed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from tests.integration.conftest import Seen, basic_config
from tests.support.gateway import in_flight_requests, port_of, write_config
from tests.support.process import async_wait_until
from tests.support.raw import exchange


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
    text = basic_config(server.port or 0).replace('bind: "127.0.0.1:0"', 'bind: "127.0.0.1:1"', 1)
    write_config(tmp_path, text)
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
    text = (
        basic_config(server.port or 0)
        + """
  - name: added
    match: {path: /added-route}
    upstream: internal:echo
"""
    )
    write_config(tmp_path, text)
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
    peers_before = set(seen.peers)
    assert (await exchange(port, b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200
    assert seen.peers <= peers_before | seen.peers  # sanity: recorded
    assert len(seen.peers) <= 2  # the warm connection (and the one the slow request used)


async def test_changed_upstream_gets_a_new_pool(
    tmp_path: Path, gw: Gateway, upstream: tuple[TestServer, Seen]
) -> None:
    server, _ = upstream
    before = gw.snapshot.upstreams["app"]
    text = basic_config(server.port or 0).replace("response_header: 2s", "response_header: 3s")
    write_config(tmp_path, text)
    assert (await gw.reload())["ok"] is True
    assert gw.snapshot.upstreams["app"] is not before
    assert (await exchange(port_of(gw), b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200
