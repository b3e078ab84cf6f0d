"""The serving process runs on one thread (README, "One thread"): no resolver pool for its IP
binds and upstreams, no watcher threads, no executor left idle by a config load or a reload.
Counted in /proc: a thread found there is a thread the kernel makes every system call pay for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.config_builder import gateway_yaml, listener, route, upstream_to
from tests.support.otlp import OtlpReceiver, otlp_receiver
from tests.support.process import (
    GatewayProcess,
    async_wait_until,
    free_port,
    http_get,
)


def _threads(pid: int) -> list[str]:
    """The names of process `pid`'s threads."""
    names = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/comm") as comm:
            names.append(comm.read().strip())
    return names


def _config(http: int, admin: int, status: int, upstream: int, prefix: str, **sections: Any) -> str:
    """`prefix` routed to an upstream (a pool's connections: no resolver for an IP address)."""
    return gateway_yaml(
        listeners=[listener(http)],
        admin={"bind": f"127.0.0.1:{admin}"},
        status={"bind": f"127.0.0.1:{status}"},
        upstreams={"app": upstream_to(f"http://127.0.0.1:{upstream}")},
        routes=[route("app", "app", prefix)],
        **sections,
    )


async def until_served(
    served: Callable[[str], Awaitable[int | None]], path: str, what: str
) -> None:
    deadline = time.monotonic() + 15
    while await served(path) != 200:
        assert time.monotonic() < deadline, f"{what} never served {path}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("traced", [False, True], ids=["untraced", "traced"])
async def test_serving_reloading_and_watching_leave_one_thread(
    tmp_path: Path, traced: bool
) -> None:
    """With tracing, spans are exported on a thread started for each export run, which ends
    with it: between exports the process is back to one thread."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    upstream = TestServer(app, host="127.0.0.1")
    async with contextlib.AsyncExitStack() as cleanup:
        await upstream.start_server()
        cleanup.push_async_callback(upstream.close)
        receiver = await cleanup.enter_async_context(otlp_receiver())
        await _serve_reload_and_count(tmp_path, upstream.port, receiver, traced, cleanup)


async def _serve_reload_and_count(
    tmp_path: Path,
    upstream: int,
    receiver: OtlpReceiver,
    traced: bool,
    cleanup: contextlib.AsyncExitStack,
) -> None:
    http, admin, status = free_port(), free_port(), free_port()
    sections: dict[str, Any] = {}
    if traced:
        batch = {"schedule_delay": "50ms"}
        sections["tracing"] = {
            "sample_ratio": 1,
            "exporter": "otlp",
            "endpoint": receiver.url,
            "batch": batch,
        }
    path = tmp_path / "gateway.yaml"
    path.write_text(_config(http, admin, status, upstream, "/one", **sections))
    gateway = GatewayProcess(path)
    cleanup.callback(gateway.stop)
    pid = gateway.proc.pid

    async def served(path: str) -> int | None:
        # aiohttp, not urllib: the upstream answers on this test's loop
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{http}{path}") as response,
            ):
                return response.status
        except aiohttp.ClientError:
            return None

    await until_served(served, "/one", "the first config")
    assert await served("/two") == 404
    # the admin and status listeners answer too (each bound by the gateway, not resolved)
    assert http_get(f"http://127.0.0.1:{admin}/readyz")[0] == 200
    assert http_get(f"http://127.0.0.1:{status}/readyz")[0] == 200
    if traced:
        # the spans of the requests above went out: the export runs ended with them
        await receiver.wait_for(2)
        await async_wait_until(
            lambda: len(_threads(pid)) == 1, within=5, what="the export run to end"
        )
    assert len(_threads(pid)) == 1, _threads(pid)

    # an editor's save: the watcher (inotify on the loop) sees it, the config is loaded on
    # a thread of its own, which ends with the load
    saved = tmp_path / ".gateway.yaml.swp"
    saved.write_text(_config(http, admin, status, upstream, "/two", **sections))
    os.replace(saved, path)
    await until_served(served, "/two", "the saved config")
    await async_wait_until(
        lambda: len(_threads(pid)) == 1, within=5, what="the load's thread to end"
    )
    if traced:
        exported = len(receiver.spans)
        assert await served("/two") == 200
        await receiver.wait_for(exported + 1)
        await async_wait_until(
            lambda: len(_threads(pid)) == 1, within=5, what="the export run to end"
        )
