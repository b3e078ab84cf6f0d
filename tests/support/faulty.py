"""Upstreams that fail on command: real aiohttp servers on 127.0.0.1 whose behaviour a test sets.

`FaultyUpstream.mode` decides how the next requests are answered:
- "ok": 200 with the endpoint's name in `X-Endpoint` and the body;
- "status:N": an empty response with status N;
- "hang": never answers (until the server closes);
- "reset": closes the connection without answering;
- "slow:S": answers 200 after S seconds;
- "drip:S": sends the head and half the body (chunked) at once, the rest S seconds later;
- "cut:N": announces a 100 kB body, sends N bytes of it, then closes the connection.
`/healthz` answers by `health` ("ok", "fail" → 503, or "hang") independently.  Every request is
counted, by method (its headers kept in `seen_headers`), so tests can prove how many reached
the upstream; a request that names an id
in `X-Test-Id` is also counted by that id (`executions`), and an "ok" answer to it says whose it
was (`X-Executed-For` and a `session` cookie), so a test sees whose response a client got.  A
request whose id is in `held` waits, once counted, until the test sets that event.
`open_connections` is how many connections are open to the server now (its own count), so a test
can prove that a pool closed what it opened.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web
from aiohttp.test_utils import TestServer

FAULTY = web.AppKey("faulty", "FaultyUpstream")


class FaultyUpstream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.mode = "ok"
        self.health = "ok"
        self.requests: Counter[str] = Counter()
        #: requests by their X-Test-Id: how often the upstream executed each operation
        self.executions: Counter[str] = Counter()
        #: X-Test-Id -> the event a request with that id waits for before it is answered
        self.held: dict[str, asyncio.Event] = {}
        self.health_checks = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.server: TestServer | None = None
        #: set whenever a request arrives (tests await it instead of sleeping)
        self.arrived = asyncio.Event()
        #: every request's headers as received (lower-case names), in arrival order
        self.seen_headers: list[list[tuple[str, str]]] = []

    @property
    def port(self) -> int:
        assert self.server is not None
        assert self.server.port is not None
        return self.server.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """host:port, as the gateway names the endpoint."""
        return f"127.0.0.1:{self.port}"

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    @property
    def open_connections(self) -> int:
        """Connections open to this upstream now, as its server counts them."""
        assert self.server is not None
        return len(self.server.handler.connections)

    async def _health(self, request: web.Request) -> web.StreamResponse:
        self.health_checks += 1
        if self.health == "hang":
            await asyncio.Event().wait()
        return web.Response(status=200 if self.health == "ok" else 503, text=self.health)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests[request.method] += 1
        self.seen_headers.append(
            [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in request.raw_headers]
        )
        test_id = request.headers.get("X-Test-Id")
        if test_id is not None:
            self.executions[test_id] += 1
        self.arrived.set()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            gate = self.held.get(test_id) if test_id is not None else None
            if gate is not None:
                await gate.wait()
            mode = self.mode
            if mode == "hang":
                await asyncio.Event().wait()
            if mode == "reset":
                assert request.transport is not None
                request.transport.abort()
                return web.Response()
            if mode.startswith("status:"):
                return web.Response(status=int(mode.split(":")[1]), text=self.name)
            if mode.startswith("drip:"):
                drip = web.StreamResponse(headers={"X-Endpoint": self.name})
                await drip.prepare(request)
                await drip.write(b"first half;")
                await asyncio.sleep(float(mode.split(":")[1]))
                await drip.write(b"second half")
                await drip.write_eof()
                return drip
            if mode.startswith("cut:"):
                cut = web.StreamResponse(headers={"X-Endpoint": self.name})
                cut.content_length = 100_000
                await cut.prepare(request)
                await cut.write(b"c" * int(mode.split(":")[1]))
                assert request.transport is not None
                request.transport.close()
                return cut
            if mode.startswith("slow:"):
                await asyncio.sleep(float(mode.split(":")[1]))
            headers = {"X-Endpoint": self.name}
            if test_id is not None:
                headers["X-Executed-For"] = test_id
                headers["Set-Cookie"] = f"session={test_id}"
            return web.Response(body=body or self.name.encode(), headers=headers)
        finally:
            self.in_flight -= 1

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._health)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app


@asynccontextmanager
async def faulty_upstreams(*names: str) -> AsyncIterator[list[FaultyUpstream]]:
    """Start one FaultyUpstream per name; close them all afterwards."""
    upstreams = [FaultyUpstream(name) for name in names]
    try:
        for upstream in upstreams:
            upstream.server = TestServer(upstream.app(), host="127.0.0.1")
            await upstream.server.start_server()
        yield upstreams
    finally:
        for upstream in upstreams:
            if upstream.server is not None:
                await upstream.server.close()


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
