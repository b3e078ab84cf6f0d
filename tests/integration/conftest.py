"""An aiohttp upstream that records what it received, and a gateway in front of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import running_gateway


@dataclass
class Seen:
    """What the upstream received: one entry per request."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    peers: set[tuple[str, int]] = field(default_factory=set)
    #: the peer port of each /slow request (not in `requests`)
    slow_peer_ports: list[int] = field(default_factory=list)


SEEN = web.AppKey("seen", Seen)


async def _echo(request: web.Request) -> web.StreamResponse:
    seen: Seen = request.app[SEEN]
    body = await request.read()
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if peer:
        seen.peers.add((peer[0], peer[1]))
    seen.requests.append(
        {
            "method": request.method,
            "path": request.raw_path,
            "headers": list(request.raw_headers),
            "body": body,
            # the gateway's end of the pooled connection the request came on
            "peer_port": peer[1] if peer else None,
        }
    )
    return web.Response(
        text=f"{request.method} {request.raw_path} {len(body)}",
        headers={"X-Upstream": "yes", "Connection": "keep-alive, X-Secret", "X-Secret": "s"},
    )


async def _big(request: web.Request) -> web.StreamResponse:
    size = int(request.query.get("size", "1048576"))
    response = web.StreamResponse()
    if request.query.get("length") == "1":
        response.content_length = size
    await response.prepare(request)
    chunk = b"x" * 65536
    sent = 0
    while sent < size:
        part = chunk[: min(65536, size - sent)]
        await response.write(part)
        sent += len(part)
    await response.write_eof()
    return response


async def _status(request: web.Request) -> web.StreamResponse:
    code = int(request.match_info["code"])
    return web.Response(status=code, headers={"ETag": '"v1"'})


async def _slow(request: web.Request) -> web.StreamResponse:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if peer:
        request.app[SEEN].slow_peer_ports.append(peer[1])
    await asyncio.sleep(float(request.query.get("s", "5")))
    return web.Response(text="late")


async def _count(request: web.Request) -> web.StreamResponse:
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
    return web.Response(text=str(total))


def upstream_app(seen: Seen) -> web.Application:
    app = web.Application()
    app[SEEN] = seen
    app.router.add_route("*", "/big", _big)
    app.router.add_route("*", "/count", _count)
    app.router.add_route("*", "/status/{code}", _status)
    app.router.add_route("*", "/slow", _slow)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[TestServer, Seen]]:
    seen = Seen()
    server = TestServer(upstream_app(seen), host="127.0.0.1")
    await server.start_server()
    try:
        yield server, seen
    finally:
        await server.close()


def basic_config(
    upstream_port: int,
    *,
    response_header: str = "2s",
    more_routes: Sequence[Mapping[str, Any]] = (),
    **sections: Any,
) -> str:
    """The `gw` fixture's config: an echo route, a GET-only route and a catch-all to the
    upstream (`response_header` its timeout), then `more_routes`; `sections` replace top-level
    sections (listeners …)."""
    return gateway_yaml(
        limits={
            "max_body_bytes": "1MiB",
            "header_timeout": "1s",
            "body_timeout": "2s",
            "idle_timeout": "5s",
        },
        upstreams={
            "app": upstream_to(
                f"http://127.0.0.1:{upstream_port}",
                timeouts={"connect": "1s", "response_header": response_header},
            )
        },
        routes=[
            route("echo", "internal:echo", "/echo"),
            route("only-get", "app", "/ro", methods=["GET"]),
            route("app", "app", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "OPTIONS"]),
            *more_routes,
        ],
        **sections,
    )


@pytest.fixture
async def gw(tmp_path: Path, upstream: tuple[TestServer, Seen]) -> AsyncIterator[Gateway]:
    server, _ = upstream
    assert server.port is not None
    async with running_gateway(tmp_path, basic_config(server.port)) as gateway:
        yield gateway


#: what the awaitable `waits_outside_a_task` wraps answers
T = TypeVar("T")


@pytest.fixture
def waits_outside_a_task(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """`asyncio.wait_for` as from Python 3.12 on, which needs the current task (as
    `asyncio.timeout` does already): the waits it was called for outside a task."""
    original = asyncio.wait_for
    outside: list[str] = []

    async def wait_for(awaitable: Awaitable[T], timeout: float | None) -> T:  # noqa: ASYNC109
        if asyncio.current_task() is None:
            outside.append(repr(awaitable))
        return await original(awaitable, timeout)

    monkeypatch.setattr(asyncio, "wait_for", wait_for)
    return outside
