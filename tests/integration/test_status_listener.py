"""The status listener (SPEC §8) over real sockets: the admin listener's probes and /metrics,
nothing else — no /admin/* even with the admin token — and /readyz 503 the moment a drain
begins.  `--workers 2` is in tests/e2e/test_status_listener.py."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from tests.integration.conftest import Seen
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import in_flight_requests, port_of, running_gateway, write_config
from tests.support.process import async_wait_until, free_port
from tests.support.raw import exchange

TOKEN = {"Authorization": "Bearer s3cret"}
LOOPBACK_ANY_PORT = {"bind": "127.0.0.1:0"}


def _config(upstream_port: int, status: Mapping[str, Any] | None = LOOPBACK_ANY_PORT) -> str:
    return gateway_yaml(
        admin={"bind": "127.0.0.1:0", "token": "s3cret"},
        status=status,
        shutdown={"drain_delay": "300ms", "timeout": "5s"},
        upstreams={"app": upstream_to(f"http://127.0.0.1:{upstream_port}")},
        routes=[route("app", "app")],
    )


@pytest.fixture
async def probed(tmp_path: Path, upstream: tuple[TestServer, Seen]) -> AsyncIterator[Gateway]:
    server, _ = upstream
    async with running_gateway(tmp_path, _config(server.port or 0)) as gateway:
        yield gateway


def _status(gateway: Gateway) -> str:
    assert gateway.status is not None
    return f"http://127.0.0.1:{gateway.status.port}"


def _admin(gateway: Gateway) -> str:
    assert gateway.admin is not None
    return f"http://127.0.0.1:{gateway.admin.port}"


async def _get(
    url: str, method: str = "GET", headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def _families(text: bytes) -> dict[str, set[tuple[str, tuple[tuple[str, str], ...]]]]:
    """Each metric family's samples, by name and labels (values move between two scrapes)."""
    return {
        family.name: {(s.name, tuple(sorted(s.labels.items()))) for s in family.samples}
        for family in text_string_to_metric_families(text.decode())
    }


async def test_the_probes_answer_as_on_the_admin_listener(probed: Gateway) -> None:
    for method in ("GET", "HEAD"):
        for path in ("/healthz", "/readyz"):
            on_admin = await _get(_admin(probed) + path, method)
            on_status = await _get(_status(probed) + path, method)
            assert on_status[0] == on_admin[0] == 200, (method, path)
            assert on_status[1]["Content-Type"] == on_admin[1]["Content-Type"]
            assert on_status[2] == on_admin[2], (method, path)
    assert (await _get(_status(probed) + "/healthz"))[2] == b"ok"
    assert json.loads((await _get(_status(probed) + "/readyz"))[2]) == {"state": "ready"}


async def test_metrics_on_status_are_the_admin_listeners(probed: Gateway) -> None:
    port = port_of(probed)
    for _ in range(3):
        assert (await exchange(port, b"GET /m HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200
    status, headers, text = await _get(_status(probed) + "/metrics")
    admin_status, admin_headers, admin_text = await _get(_admin(probed) + "/metrics")
    assert status == admin_status == 200
    assert headers["Content-Type"] == admin_headers["Content-Type"]
    families = _families(text)
    assert families == _families(admin_text)
    assert ("gateway_requests_total", (("code", "200"), ("method", "GET"), ("route", "app"))) in (
        families["gateway_requests"]
    )
    # the scraper's choice of format is honoured the same way
    openmetrics = {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"}
    _, om_headers, om_text = await _get(_status(probed) + "/metrics", headers=openmetrics)
    _, admin_om_headers, _ = await _get(_admin(probed) + "/metrics", headers=openmetrics)
    assert om_headers["Content-Type"] == admin_om_headers["Content-Type"]
    assert om_headers["Content-Type"].startswith("application/openmetrics-text")
    assert om_text.endswith(b"# EOF\n")


NOT_SERVED = [
    ("admin-config-with-token", "GET", "/admin/config"),
    ("admin-routes-with-token", "GET", "/admin/routes"),
    ("admin-upstreams-with-token", "GET", "/admin/upstreams"),
    ("admin-stores-with-token", "GET", "/admin/stores"),
    ("admin-reload-with-token", "POST", "/admin/reload"),
    ("admin-prefix", "GET", "/admin/"),
    ("root", "GET", "/"),
    ("trailing-slash", "GET", "/healthz/"),
    ("below-metrics", "GET", "/metrics/x"),
    ("other-case", "GET", "/READYZ"),
    ("other", "GET", "/favicon.ico"),
    ("head-other", "HEAD", "/admin/config"),
]


@pytest.mark.parametrize(
    ("method", "path"), [c[1:] for c in NOT_SERVED], ids=[c[0] for c in NOT_SERVED]
)
async def test_status_serves_nothing_else(probed: Gateway, method: str, path: str) -> None:
    status, headers, body = await _get(_status(probed) + path, method, headers=TOKEN)
    assert status == 404
    assert headers["Content-Type"] == "application/problem+json"
    if method != "HEAD":
        problem = json.loads(body)
        assert (problem["code"], problem["status"]) == ("no_route", 404)
        assert problem["detail"] == f"no status endpoint at {path}"
    # nothing a request to the status port asks of the admin API happens
    assert probed.last_reload["at"] is None


async def test_the_admin_api_with_the_same_token_is_on_the_admin_listener_only(
    probed: Gateway,
) -> None:
    """So the 404s above are the status listener's answer, not a token problem."""
    assert (await _get(_admin(probed) + "/admin/config", headers=TOKEN))[0] == 200
    assert (await _get(_admin(probed) + "/admin/config"))[0] == 401
    assert (await _get(_status(probed) + "/admin/config"))[0] == 404


async def test_other_methods_get_the_admin_listeners_405(probed: Gateway) -> None:
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        status, headers, body = await _get(_status(probed) + "/metrics", method)
        admin_status, admin_headers, _ = await _get(_admin(probed) + "/metrics", method)
        assert status == admin_status == 405, method
        assert headers["Allow"] == admin_headers["Allow"] == "GET, HEAD"
        assert json.loads(body)["code"] == "method_not_allowed"


MALFORMED = [
    # aiohttp keeps non-HTTP bytes (scanners, TLS sent to a plain port) at DEBUG
    ("not-http", b"HELLO\r\n\r\n", logging.DEBUG),
    ("bad-version", b"GET /healthz HTTP/9.9\r\nHost: a\r\n\r\n", logging.WARNING),
    ("space-in-header-name", b"GET /healthz HTTP/1.1\r\nHo st: a\r\n\r\n", logging.WARNING),
    (
        "bad-content-length",
        b"GET /readyz HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
        logging.WARNING,
    ),
    (
        "line-too-long",
        b"GET /metrics HTTP/1.1\r\nX-Secret: " + b"Z" * 9000 + b"\r\n\r\n",
        logging.WARNING,
    ),
]


@pytest.mark.parametrize(
    ("request_bytes", "level"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
async def test_a_malformed_request_is_a_400_and_one_line_without_its_bytes(
    probed: Gateway, request_bytes: bytes, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    assert probed.status is not None
    with caplog.at_level(logging.DEBUG, logger="gateway.status"):
        response = await exchange(probed.status.port, request_bytes)
    assert response.status == 400
    (record,) = [r for r in caplog.records if r.name == "gateway.status"]
    assert record.getMessage().startswith("status listener: malformed request (")
    assert (record.levelno, record.exc_info) == (level, None)
    assert "ZZZZ" not in caplog.text
    # and the listener goes on serving
    assert (await _get(_status(probed) + "/healthz"))[0] == 200


async def test_readyz_on_status_turns_503_as_the_drain_begins(probed: Gateway) -> None:
    port = port_of(probed)
    in_flight = asyncio.ensure_future(
        exchange(port, b"GET /slow?s=0.8 HTTP/1.1\r\nHost: a\r\n\r\n")
    )
    await async_wait_until(lambda: in_flight_requests(probed) == 1, what="request in flight")
    draining = asyncio.ensure_future(probed.drain())
    # one turn of the loop runs the drain's first step: the very first answer says draining
    await asyncio.sleep(0)
    status, _, body = await _get(_status(probed) + "/readyz")
    assert (status, json.loads(body)) == (503, {"state": "draining"})
    assert (await _get(_admin(probed) + "/readyz"))[0] == 503
    # alive all the same, and still serving the in-flight request and new ones in drain_delay
    assert (await _get(_status(probed) + "/healthz"))[0] == 200
    assert (await exchange(port, b"GET /during HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200
    assert (await in_flight).status == 200
    await asyncio.wait_for(draining, 10)
    assert probed.status is None  # closed with the rest once drained


RESTART_NEEDED = [
    (
        "moved",
        LOOPBACK_ANY_PORT,
        "free",
        "status.bind: the status address cannot change while running: restart needed",
    ),
    (
        "added",
        None,
        "free",
        "status: a status listener cannot be added or removed while running: restart needed",
    ),
    (
        "removed",
        LOOPBACK_ANY_PORT,
        None,
        "status: a status listener cannot be added or removed while running: restart needed",
    ),
]


@pytest.mark.parametrize(
    ("before", "after", "error"),
    [c[1:] for c in RESTART_NEEDED],
    ids=[c[0] for c in RESTART_NEEDED],
)
async def test_a_status_change_needs_a_restart_like_admin_bind(
    tmp_path: Path,
    upstream: tuple[TestServer, Seen],
    before: Mapping[str, Any] | None,
    after: str | None,
    error: str,
) -> None:
    server, _ = upstream
    async with running_gateway(tmp_path, _config(server.port or 0, before)) as gateway:
        serving = gateway.status
        new_status = {"bind": f"127.0.0.1:{free_port()}"} if after == "free" else None
        write_config(tmp_path, _config(server.port or 0, new_status))
        result = await gateway.reload()
        assert (result["ok"], result["error"]) == (False, error)
        assert gateway.last_reload["error"] == error
        # nothing of that change applied: the status listener is the one it was
        assert gateway.status is serving
        if serving is not None:
            assert (await _get(_status(gateway) + "/readyz"))[0] == 200


async def test_a_reload_that_keeps_the_status_bind_applies(
    tmp_path: Path, upstream: tuple[TestServer, Seen]
) -> None:
    server, _ = upstream
    async with running_gateway(tmp_path, _config(server.port or 0)) as gateway:
        version = gateway.snapshot.version
        write_config(tmp_path, _config(server.port or 0) + "trusted_proxies: [127.0.0.1]\n")
        result = await gateway.reload()
        assert result["ok"] is True, result
        assert gateway.snapshot.version != version
        assert (await _get(_status(gateway) + "/readyz"))[0] == 200


async def test_without_status_no_status_listener(
    tmp_path: Path, upstream: tuple[TestServer, Seen]
) -> None:
    server, _ = upstream
    async with running_gateway(tmp_path, _config(server.port or 0, None)) as gateway:
        assert gateway.status is None
        assert (await _get(_admin(gateway) + "/readyz"))[0] == 200
