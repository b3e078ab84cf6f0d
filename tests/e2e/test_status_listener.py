"""The status listener as `gateway run --workers 2` serves it: /metrics summed over both workers
and the same as the admin listener's, no admin API, /readyz 503 as soon as SIGTERM arrives; and
`gateway check` / `gateway run` refusing a status address that cannot work."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.config_builder import gateway_yaml, listener, route
from tests.support.process import GatewayProcess, async_wait_until, free_port, http_get
from tests.support.raw import exchange

#: at least this many requests, and more until both workers have answered
REQUESTS = 40
ECHO = b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n"
TOKEN = {"Authorization": "Bearer s3cret"}
#: SIGTERM reaches the workers through the supervisor, which looks at signals every 50 ms
AT_ONCE = 1.0


def _config(http: int, admin: int, status: int) -> str:
    return gateway_yaml(
        listeners=[listener(http)],
        admin={"bind": f"127.0.0.1:{admin}", "token": "s3cret"},
        status={"bind": f"127.0.0.1:{status}"},
        # long enough to look at the draining gateway, far longer than AT_ONCE
        shutdown={"drain_delay": "3s", "timeout": "5s"},
        routes=[route("echo", "internal:echo", "/echo")],
    )


def _readyz(port: int) -> int:
    try:
        return http_get(f"http://127.0.0.1:{port}/readyz", timeout=1)[0]
    except OSError:
        return 0


async def _get(url: str, **headers: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
        return r.status, await r.text()


def _families(text: str) -> dict[str, set[tuple[str, tuple[tuple[str, str], ...]]]]:
    return {
        family.name: {(s.name, tuple(sorted(s.labels.items()))) for s in family.samples}
        for family in text_string_to_metric_families(text)
    }


def _echo_requests(text: str) -> float:
    """gateway_requests_total for the echo route, as one /metrics answer sums it."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gateway_requests_total" and s.labels.get("route") == "echo"
    )


async def test_status_with_two_workers(tmp_path: Path) -> None:
    http, admin, status = free_port(), free_port(), free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(_config(http, admin, status))
    gateway = GatewayProcess(path, "--workers", "2", "--no-watch")
    try:
        await async_wait_until(lambda: _readyz(status) == 200, within=30, what="status ready")
        # a request id begins with a prefix of its own per process; /readyz is worker 0's, so
        # worker 1 may still be starting: send until both have answered
        prefixes: set[str] = set()
        sent = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (len(prefixes) < 2 or sent < REQUESTS) and loop.time() < deadline:
            response = await exchange(http, ECHO)
            assert response.status == 200
            prefixes.add((response.header("x-request-id") or "").split("-")[0])
            sent += 1
            if sent >= REQUESTS:
                await asyncio.sleep(0.05)  # polling for worker 1 now: no need to flood it
        assert len(prefixes) == 2, prefixes

        # each worker publishes its figures once a second: poll until worker 0 has them all
        scraped: list[str] = []

        def counted_all() -> bool:
            scraped[:] = [http_get(f"http://127.0.0.1:{status}/metrics", timeout=2)[1].decode()]
            return _echo_requests(scraped[0]) == sent

        await async_wait_until(counted_all, within=10, what="both workers' requests counted")
        admin_status, admin_text = await _get(f"http://127.0.0.1:{admin}/metrics")
        assert admin_status == 200
        assert _echo_requests(admin_text) == sent
        assert _families(scraped[0]) == _families(admin_text)

        # the admin API is on the admin port only, whatever the request carries
        assert (await _get(f"http://127.0.0.1:{admin}/admin/config", **TOKEN))[0] == 200
        not_found = await _get(f"http://127.0.0.1:{status}/admin/config", **TOKEN)
        assert not_found[0] == 404
        assert json.loads(not_found[1])["code"] == "no_route"

        gateway.signal(signal.SIGTERM)
        await async_wait_until(
            lambda: _readyz(status) == 503, within=AT_ONCE, what="status /readyz 503"
        )
        readyz = await _get(f"http://127.0.0.1:{status}/readyz")
        assert json.loads(readyz[1]) == {"state": "draining"}
        assert (await _get(f"http://127.0.0.1:{admin}/readyz"))[0] == 503
        # still alive, and the listeners still accept during drain_delay
        assert (await _get(f"http://127.0.0.1:{status}/healthz")) == (200, "ok")
        assert (await exchange(http, ECHO)).status == 200
        assert await asyncio.to_thread(gateway.wait, 30) == 0
    finally:
        gateway.stop()


def test_check_refuses_a_status_address_the_admin_api_binds(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        'listeners: [{name: http, bind: "127.0.0.1:8080"}]\n'
        'admin: {bind: "127.0.0.1:9901"}\n'
        'status: {bind: "127.0.0.1:9901", token: x}\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout
    assert result.stdout.splitlines() == [
        "status.token: unknown key",
        "status.bind: the admin listener already binds this address; give status its own",
    ]


async def test_run_stops_when_the_status_address_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        path = tmp_path / "gateway.yaml"
        path.write_text(_config(free_port(), free_port(), port))
        gateway = GatewayProcess(path, "--no-watch")
        try:
            assert await asyncio.to_thread(gateway.wait, 30) == 1
        finally:
            gateway.stop()
    errors = [r for r in gateway.log_records() if r.get("level") == "ERROR"]
    assert any("cannot start" in str(r.get("message")) for r in errors), gateway.lines
