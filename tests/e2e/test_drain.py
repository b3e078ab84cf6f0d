"""SIGTERM under keep-alive load with `--workers 2`: no accepted request may be dropped (SPEC §7).

Eight clients run tight keep-alive loops through `gateway run --workers 2` to a real upstream,
and two more open a connection for every request (so that fresh connections keep arriving as
the listeners close); the supervisor gets SIGTERM; every request must be answered.  A client
behaves like a real HTTP client (Go's net/http, RFC 9112 §9.3.1): it retries a request on a new
connection only when it is idempotent and was sent on a *reused* connection that closed before
any byte of the response arrived (the keep-alive race every client must handle).  Everything
else is a failure: a fresh connection reset or closed without an answer (a connection the
kernel had accepted), a response cut short, a status other than 200.  A connection refused, or
whose handshake never completes, after SIGTERM was never accepted: the client stops there.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.config_builder import gateway_yaml, listener, route, upstream_to
from tests.support.process import GatewayProcess, async_wait_until, free_port, http_get

REPETITIONS = 20
KEEP_ALIVE_CLIENTS = 8
ONE_REQUEST_CLIENTS = 2
REQUEST = b"GET /app/x HTTP/1.1\r\nHost: gateway.test\r\n\r\n"
ONE_REQUEST = b"GET /app/x HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n"
#: a SYN the draining gateway drops is retried by the kernel after a second: by then the
#: listener is gone, so waiting that long would tell nothing more
CONNECT_TIMEOUT = 0.5
#: far longer than any answer takes here: a response this late is a failure
ANSWER_TIMEOUT = 5.0


@dataclass
class Tally:
    ok: int = 0
    #: requests sent again after a reused connection closed before any byte of the answer
    retried: int = 0
    #: clients stopped by a connection the gateway no longer accepts, after SIGTERM
    refused: int = 0
    failures: list[str] = field(default_factory=list)


class _ClosedBeforeAnswer(Exception):
    """EOF or reset before the first byte of the response."""


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(0.005)  # so that requests are in flight when the drain begins
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


def _config(http: int, admin: int, upstream_port: int) -> str:
    return gateway_yaml(
        listeners=[listener(http)],
        admin={"bind": f"127.0.0.1:{admin}"},
        shutdown={"drain_delay": "100ms", "timeout": "5s"},
        upstreams={"app": upstream_to(f"http://127.0.0.1:{upstream_port}")},
        routes=[route("app", "app", "/app")],
    )


async def _answer(reader: asyncio.StreamReader) -> bool:
    """Read one response; True when it asks to close the connection."""
    try:
        first = await reader.read(1)
    except ConnectionError as exc:
        raise _ClosedBeforeAnswer(repr(exc)) from exc
    if not first:
        raise _ClosedBeforeAnswer("EOF")
    head = first + await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {n.lower(): v.strip() for n, _, v in (x.partition(":") for x in lines[1:] if x)}
    body = await reader.readexactly(int(fields.get("content-length", "0")))
    if not lines[0].startswith("HTTP/1.1 200 ") or body != b"done":
        raise AssertionError(f"{lines[0]!r} {body[:80]!r}")
    return fields.get("connection", "").lower() == "close"


async def _client(port: int, tally: Tally, terminated: asyncio.Event, request: bytes) -> None:
    writer: asyncio.StreamWriter | None = None
    reused = False
    try:
        while True:
            if writer is None:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT
                    )
                except (OSError, TimeoutError) as exc:
                    if not terminated.is_set():
                        tally.failures.append(f"connect before SIGTERM: {exc!r}")
                    tally.refused += 1
                    return
                reused = False
            writer.write(request)
            try:
                close = await asyncio.wait_for(_answer(reader), ANSWER_TIMEOUT)
            except _ClosedBeforeAnswer as exc:
                writer.close()
                writer = None
                if not reused:
                    tally.failures.append(f"fresh connection closed without an answer: {exc}")
                    return
                tally.retried += 1  # what a real client does on its own: send it again
                continue
            except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
                tally.failures.append(f"answer cut short: {exc!r}")
                return
            except AssertionError as exc:
                tally.failures.append(f"not the upstream's answer: {exc}")
                return
            tally.ok += 1
            reused = True
            if close:
                writer.close()
                writer = None
    finally:
        if writer is not None:
            writer.close()


async def _one_drain(tmp_path: Path, upstream: int) -> tuple[Tally, int]:
    http, admin = free_port(), free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(_config(http, admin, upstream))
    gateway = GatewayProcess(path, "--workers", "2", "--no-watch")
    tally = Tally()
    terminated = asyncio.Event()
    try:
        await async_wait_until(lambda: _ready(admin), what="readyz")
        clients = [
            asyncio.ensure_future(_client(http, tally, terminated, request))
            for request in [REQUEST] * KEEP_ALIVE_CLIENTS + [ONE_REQUEST] * ONE_REQUEST_CLIENTS
        ]
        await async_wait_until(lambda: tally.ok >= 100 or tally.failures != [], what="load")
        terminated.set()
        gateway.signal(signal.SIGTERM)
        code = await asyncio.to_thread(gateway.wait, 30)
        await asyncio.wait_for(asyncio.gather(*clients), 30)
    finally:
        gateway.stop()
    return tally, code


def _ready(admin: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{admin}/readyz", timeout=1)[0] == 200
    except OSError:
        return False


@pytest.mark.timeout(240)
async def test_sigterm_with_two_workers_drops_no_request(
    tmp_path: Path, upstream: TestServer
) -> None:
    assert upstream.port is not None
    results = [await _one_drain(tmp_path, upstream.port) for _ in range(REPETITIONS)]
    failed = [(i, t.failures) for i, (t, _) in enumerate(results) if t.failures]
    summary = [(t.ok, t.retried, t.refused, len(t.failures), code) for t, code in results]
    assert failed == [], f"failures {failed}; (ok, retried, refused, failed, exit code): {summary}"
    assert all(code == 0 for _, code in results), summary
    assert all(t.ok >= 100 for t, _ in results), summary
