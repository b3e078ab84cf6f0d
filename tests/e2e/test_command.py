"""The `gateway` command as a user runs it: serve, check, reload, drain, workers."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from gateway.certificates import check_certificate
from gateway.core.idempotency_tokens import verify_token
from tests.support.certs import ensure_dev_certificates
from tests.support.config_builder import gateway_yaml, listener, route, upstream_to
from tests.support.process import (
    GatewayProcess,
    async_wait_until,
    free_port,
    http_get,
    http_post,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
#: what Prometheus sends by default, and the answer it gets
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def config_text(
    http: int, admin: int, upstream: int | None = None, extra_route: Mapping[str, Any] | None = None
) -> str:
    """Route /echo to the echo handler, /app to `upstream` when given, then `extra_route`; the
    access log as the loader leaves it (on)."""
    routes: list[Mapping[str, Any]] = [route("echo", "internal:echo", "/echo")]
    upstreams = None
    if upstream is not None:
        upstreams = {"app": upstream_to(f"http://127.0.0.1:{upstream}")}
        routes.append(route("app", "app", "/app"))
    if extra_route is not None:
        routes.append(extra_route)
    return gateway_yaml(
        listeners=[listener(http)],
        admin={"bind": f"127.0.0.1:{admin}"},
        shutdown={"drain_delay": "300ms", "timeout": "10s"},
        access_log={},
        upstreams=upstreams,
        routes=routes,
    )


#: the route a reload adds
ADDED = route("added", "internal:echo", match={"path": "/added"})


def run_check(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_check_accepts_the_shipped_configs() -> None:
    ensure_dev_certificates()
    for path in [
        REPO / "config" / "gateway.yaml",
        *sorted((REPO / "config" / "examples").glob("*.yaml")),
    ]:
        result = run_check(path)
        assert result.returncode == 0, (path, result.stdout, result.stderr)
        assert result.stdout.startswith("ok "), result.stdout
        assert len(result.stdout.split()[1]) == 12


def test_check_reports_every_error_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        """
listeners: [{name: http, bind: "127.0.0.1:8080"}]
limits: {max_conections: 5}
routes:
  - name: r
    match: {path_prefix: /x}
    upstream: nowhere
"""
    )
    result = run_check(path)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "limits.max_conections" in output
    assert "routes[0].upstream" in output


def test_check_reports_an_unset_variable_a_duplicate_key_and_the_rest_at_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        """\
listeners: [{name: http, bind: "127.0.0.1:8080"}]
admin: {token: "${GATEWAY_ADMIN_TOKEN}"}
limits:
  max_connections: 100
  max_connections: 10
  header_timeout: 10
routes:
  - {name: r, match: {path_prefix: /x}, upstream: nowhere}
"""
    )
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_ADMIN_TOKEN"}
    result = run_check(path, env)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        "limits.max_connections: duplicate key (line 5; first defined on line 4)",
        "admin.token: environment variable GATEWAY_ADMIN_TOKEN is not set",
        "limits.header_timeout: must be a duration with a unit like 250ms, 5s, 1m or 24h, not 10",
        "routes[0].upstream: unknown upstream 'nowhere'",
    ]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_refuses_an_invalid_config_and_exits(tmp_path: Path, workers: str) -> None:
    """With one worker or several (a supervisor would otherwise restart workers for ever), the
    errors with their paths on stderr and exit status 1, before anything listens."""
    port = free_port()
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"""
listeners: [{{name: http, bind: "127.0.0.1:{port}"}}]
routes:
  - name: r
    match: {{path_prefix: /x}}
    upstream: nowhere
"""
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--workers", workers, "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "routes[0].upstream" in result.stderr
    # (one worker says so in its log line on stdout, a supervisor on stderr)
    assert "configuration rejected: 1 error(s)" in result.stdout + result.stderr


def test_version_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("gateway ")


def test_run_serves_reloads_on_sighup_and_drains_on_sigterm(tmp_path: Path) -> None:
    http, admin = free_port(), free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text(http, admin))
    gateway = GatewayProcess(path)
    try:
        wait_until(lambda: _ready(admin), what="readyz")
        status, body = http_get(f"http://127.0.0.1:{http}/echo/hi")
        assert status == 200
        assert json.loads(body)["path"] == "/echo/hi"
        status, _ = http_get(f"http://127.0.0.1:{http}/added")
        assert status == 404

        # a valid change is applied on SIGHUP
        path.write_text(
            config_text(
                http,
                admin,
                extra_route=ADDED,
            )
        )
        gateway.signal(signal.SIGHUP)
        wait_until(lambda: http_get(f"http://127.0.0.1:{http}/added")[0] == 200, what="reload")

        # an invalid change is rejected whole; the old config keeps serving
        path.write_text("listeners: [{name: http, bind: 'nope'}]\nroutes: 7\n")
        gateway.signal(signal.SIGHUP)
        wait_until(
            lambda: (
                json.loads(http_get(f"http://127.0.0.1:{admin}/admin/config")[1])["last_reload"][
                    "ok"
                ]
                is False
            ),
            what="failed reload reported",
        )
        assert http_get(f"http://127.0.0.1:{http}/added")[0] == 200
        metrics = http_get(f"http://127.0.0.1:{admin}/metrics")[1].decode()
        assert "gateway_config_last_reload_success 0" in metrics
    finally:
        gateway.signal(signal.SIGTERM)
        code = gateway.wait(30)
    assert code == 0
    messages = [r.get("message") for r in gateway.log_records()]
    assert "gateway ready" in messages


def _ready(admin: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{admin}/readyz", timeout=1)[0] == 200
    except OSError:
        return False


class SlowUpstream:
    """An upstream answering every GET after 0.2 s, counting what it received and answered."""

    def __init__(self) -> None:
        self.received = 0
        self.answered = 0
        self.server: TestServer | None = None

    @property
    def port(self) -> int | None:
        return None if self.server is None else self.server.port

    async def handler(self, request: web.Request) -> web.Response:
        self.received += 1
        await asyncio.sleep(0.2)
        self.answered += 1
        return web.Response(text="done")


@pytest.fixture
async def slow_upstream() -> AsyncIterator[SlowUpstream]:
    upstream = SlowUpstream()
    app = web.Application()
    app.router.add_get("/{tail:.*}", upstream.handler)
    upstream.server = TestServer(app, host="127.0.0.1")
    await upstream.server.start_server()
    yield upstream
    await upstream.server.close()


async def test_sigterm_under_load_drops_no_accepted_request(
    tmp_path: Path, slow_upstream: SlowUpstream
) -> None:
    http, admin = free_port(), free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text(http, admin, upstream=slow_upstream.port))
    gateway = GatewayProcess(path)
    ok = 0
    failures: list[str] = []
    refused = 0
    stop = asyncio.Event()
    try:
        await async_wait_until(lambda: _ready(admin), what="readyz")

        async def client() -> None:
            nonlocal ok, refused
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                for _ in range(200):
                    if stop.is_set():
                        return
                    try:
                        async with session.get(f"http://127.0.0.1:{http}/app/x") as response:
                            body = await response.text()
                            if response.status == 200 and body == "done":
                                ok += 1
                            else:
                                failures.append(f"{response.status} {body[:80]}")
                    except aiohttp.ClientConnectorError:
                        refused += 1  # the listener is closed: never accepted, not dropped
                        return
                    except aiohttp.ClientError as exc:
                        failures.append(repr(exc))

        clients = [asyncio.ensure_future(client()) for _ in range(20)]
        await async_wait_until(lambda: ok >= 40, what="load flowing")
        gateway.signal(signal.SIGTERM)
        # requests the upstream holds as the signal is sent: the drain must see them through
        in_flight_at_sigterm = slow_upstream.received - slow_upstream.answered
        code = await asyncio.to_thread(gateway.wait, 30)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 30)
    finally:
        gateway.stop()
    assert code == 0
    assert failures == []
    # over the wire: the drain had requests in flight at the upstream to finish, and every
    # request that reached the upstream came back to its client as a whole 200 "done"
    assert in_flight_at_sigterm >= 1
    assert slow_upstream.answered == slow_upstream.received
    assert ok == slow_upstream.received


async def test_workers_share_the_port_and_a_killed_worker_is_restarted(tmp_path: Path) -> None:
    http, admin = free_port(), free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text(http, admin))
    gateway = GatewayProcess(path, "--workers", "2")
    try:
        await async_wait_until(lambda: len(_children(gateway.proc.pid)) == 2, what="2 workers")
        await async_wait_until(lambda: _ready(admin), what="readyz")
        first = _children(gateway.proc.pid)
        async with aiohttp.ClientSession() as session:
            for _ in range(10):
                async with session.get(f"http://127.0.0.1:{http}/echo") as response:
                    assert response.status == 200
            victim = first[-1]
            os.kill(victim, signal.SIGKILL)
            await async_wait_until(
                lambda: (
                    len(_children(gateway.proc.pid)) == 2
                    and victim not in _children(gateway.proc.pid)
                ),
                what="worker restarted",
            )
            await async_wait_until(lambda: _ready(admin), what="readyz after restart")
            for _ in range(10):
                async with session.get(f"http://127.0.0.1:{http}/echo") as response:
                    assert response.status == 200
            status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{admin}/metrics")
            assert status == 200
            assert b"gateway_requests_total" in body
            # what Prometheus asks for by default: OpenMetrics, merged as strictly valid text
            status, headers, body = await asyncio.to_thread(
                _get, f"http://127.0.0.1:{admin}/metrics", {"Accept": PROMETHEUS_ACCEPT}
            )
            assert status == 200
            assert headers["Content-Type"] == OPENMETRICS
            families = {f.name: f for f in openmetrics_families(body.decode())}
            assert families["gateway_requests"].type == "counter"
            assert families["gateway_build"].type == "info"
            echo = [
                s.value
                for s in families["gateway_requests"].samples
                if s.name == "gateway_requests_total" and s.labels["route"] == "echo"
            ]
            assert sum(echo) >= 1
            # SIGHUP to the parent reloads every worker; POST /admin/reload on worker 0 too
            await async_wait_until(lambda: _listening(http) == 2, what="both workers listening")
            path.write_text(
                config_text(
                    http,
                    admin,
                    extra_route=ADDED,
                )
            )
            gateway.signal(signal.SIGHUP)
            # fresh connections land on either worker: all of them must know the new route
            await async_wait_until(
                lambda: all(
                    http_get(f"http://127.0.0.1:{http}/added")[0] == 200 for _ in range(20)
                ),
                what="every worker reloaded",
            )
            status, body = await asyncio.to_thread(
                http_post, f"http://127.0.0.1:{admin}/admin/reload"
            )
            assert status == 200
            assert json.loads(body)["ok"] is True
        gateway.signal(signal.SIGTERM)
        code = await asyncio.to_thread(gateway.wait, 60)
        assert code == 0, "\n".join(gateway.lines[-30:])
    finally:
        gateway.stop()
    unchanged = [
        r
        for r in gateway.log_records()
        if r.get("message") == "configuration reloaded" and r.get("changed") is False
    ]
    # the admin reload ran in worker 0, and reached worker 1 through the supervisor (SIGUSR1)
    assert {r.get("worker") for r in unchanged} == {0, 1}


def _get(url: str, headers: Mapping[str, str]) -> tuple[int, Mapping[str, str], bytes]:
    """A GET on a connection of its own (urllib does not keep connections alive)."""
    request = urllib.request.Request(url, headers=dict(headers))
    with urllib.request.urlopen(request, timeout=5) as response:
        return int(response.status), response.headers, response.read()


def _exemplar_traces(admin: int) -> set[str]:
    """The trace ids of the exemplars /metrics shows as OpenMetrics (strictly parsed)."""
    status, headers, body = _get(f"http://127.0.0.1:{admin}/metrics", {"Accept": PROMETHEUS_ACCEPT})
    assert status == 200
    assert headers["Content-Type"] == OPENMETRICS
    return {
        s.exemplar.labels["trace_id"]
        for family in openmetrics_families(body.decode())
        for s in family.samples
        if s.exemplar is not None
    }


def _shows_exemplar(admin: int, trace: str) -> bool:
    return trace in _exemplar_traces(admin)


async def test_openmetrics_with_workers_shows_the_exemplars_of_either(tmp_path: Path) -> None:
    http, admin = free_port(), free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(
        gateway_yaml(
            listeners=[listener(http)],
            admin={"bind": f"127.0.0.1:{admin}"},
            shutdown={"drain_delay": "300ms", "timeout": "10s"},
            # new traces unsampled: only the requests below that say "sampled" are
            tracing={"service_name": "edge", "sample_ratio": 0, "exporter": "console"},
            routes=[route("echo", "internal:echo", "/echo")],
        )
    )
    gateway = GatewayProcess(path, "--workers", "2")
    try:
        await async_wait_until(lambda: len(_children(gateway.proc.pid)) == 2, what="2 workers")
        await async_wait_until(lambda: _ready(admin), what="readyz")
        await async_wait_until(lambda: _listening(http) == 2, what="both workers listening")
        # the request id's prefix is random per process: it tells which worker answered
        served_by: set[str] = set()
        for attempt in range(1, 60):
            trace = f"{attempt:032x}"
            status, headers, _ = await asyncio.to_thread(
                _get,
                f"http://127.0.0.1:{http}/echo",
                {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"},
            )
            assert status == 200
            served_by.add(headers["X-Request-Id"].split("-")[0])
            # the latest sampled request of its bucket, whichever worker served it: only worker
            # 0 serves /metrics, so worker 1's comes through its published snapshot
            await async_wait_until(
                functools.partial(_shows_exemplar, admin, trace),
                what=f"the exemplar of trace {trace}",
            )
            if len(served_by) == 2:
                break
        assert len(served_by) == 2
        gateway.signal(signal.SIGTERM)
        code = await asyncio.to_thread(gateway.wait, 60)
        assert code == 0, "\n".join(gateway.lines[-30:])
    finally:
        gateway.stop()


def _listening(port: int) -> int:
    """How many sockets listen on 127.0.0.1:`port` (one per worker with SO_REUSEPORT)."""
    needle = f"0100007F:{port:04X}"
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for row in rows if row.split()[1] == needle and row.split()[3] == "0A")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def test_certs_init_writes_a_working_set(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "certs",
            "init",
            "--out",
            str(tmp_path / "c"),
            "--hosts",
            "example.test,127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "anyone with ca.key can mint certificates these trust" in result.stdout
    out = tmp_path / "c"
    assert {p.name for p in out.iterdir()} == {
        f"{n}.{e}" for n in ("ca", "server", "client") for e in ("crt", "key")
    }
    assert oct((out / "client.key").stat().st_mode & 0o777) == "0o600"
    server = check_certificate(out / "server.crt", out / "server.key")
    assert server.names == ("example.test", "127.0.0.1")
    client = check_certificate(out / "client.crt", out / "client.key")
    assert client.names == ("client.gateway.dev",)
    ctx = ssl.create_default_context(cafile=str(out / "ca.crt"))
    assert ctx.cert_store_stats()["x509_ca"] == 1


@pytest.mark.parametrize("watch", [True, False], ids=["watching", "no-watch"])
def test_run_reloads_on_a_saved_edit_unless_told_not_to(tmp_path: Path, watch: bool) -> None:
    http, admin = free_port(), free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text(http, admin))
    gateway = GatewayProcess(path, *([] if watch else ["--no-watch"]))
    try:
        wait_until(lambda: _ready(admin), what="readyz")
        added = config_text(
            http,
            admin,
            extra_route=ADDED,
        )
        temporary = tmp_path / ".gateway.yaml.tmp"
        temporary.write_text(added)
        os.replace(temporary, path)  # an editor's save
        if watch:
            wait_until(lambda: http_get(f"http://127.0.0.1:{http}/added")[0] == 200, what="reload")
        else:
            # nothing may happen: give a watcher every chance (several debounce periods)
            time.sleep(1.0)
            assert http_get(f"http://127.0.0.1:{http}/added")[0] == 404
            gateway.signal(signal.SIGHUP)
            wait_until(lambda: http_get(f"http://127.0.0.1:{http}/added")[0] == 200, what="reload")
    finally:
        gateway.stop()


def test_token_command_mints_a_verifiable_token() -> None:
    secret = "a-secret-for-this-test-only-0123456789"
    env = dict(os.environ, IDEMPOTENCY_SECRET=secret)
    command = [sys.executable, "-m", "gateway", "token", "--client-id", "user_7"]
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.startswith("v1.")
    assert verify_token(token, secret, "user_7", window=60)
    assert secret not in result.stdout
    env.pop("IDEMPOTENCY_SECRET")
    missing = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert missing.returncode == 2
    assert "IDEMPOTENCY_SECRET" in missing.stderr


@pytest.mark.parametrize(
    ("level", "info_written"), [("info", True), ("warning", False)], ids=["info", "warning"]
)
def test_log_level_sets_the_least_severe_app_line(
    tmp_path: Path, level: str, info_written: bool
) -> None:
    http, admin = free_port(), free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text(http, admin))
    gateway = GatewayProcess(path, "--log-level", level)
    try:
        wait_until(lambda: _ready(admin), what="readyz")
        assert http_get(f"http://127.0.0.1:{http}/echo/hi")[0] == 200
    finally:
        gateway.signal(signal.SIGTERM)
        code = gateway.wait(30)
    assert code == 0
    records = gateway.log_records()
    app = [r for r in records if r.get("type") == "app"]
    access = [r for r in records if r.get("type") == "access"]
    # "gateway ready" is an INFO line; the echo request's access line is not an app line
    assert ("gateway ready" in [r.get("message") for r in app]) is info_written
    assert all(r["level"] != "INFO" for r in app) is not info_written
    assert [r["path"] for r in access] == ["/echo/hi"]
    for record in records:
        assert list(record)[:3] == ["time", "level", "type"]
