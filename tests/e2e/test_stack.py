"""docker-compose.yml's topology from local processes (deploy/stack/, `make stack`), end to
end: two `gateway run --workers 2` replicas on config/compose.yaml sharing a real redis-server,
two demo upstreams that count what they execute, an OTLP/HTTP receiver, and Debian's prometheus.

One stack serves the module's tests (starting it takes seconds); each test uses its own route,
key or trace so that none depends on another's traffic. Another stack is started through
`python -m deploy.stack` to show that a signal to the launcher leaves no process behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from deploy.stack.launcher import (
    REPO,
    Ports,
    Stack,
    StackError,
    alive,
    gateway_env,
    group_members,
    read_spans,
)
from gateway.config.model import GatewayConfig
from gateway.stages.rate_limit import RateLimitConfig
from tests.support.config import load_config

T = TypeVar("T")


@dataclass
class Answer:
    status: int
    headers: Message
    body: bytes


def _request(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes = b""
) -> Answer:
    """One request on a new connection (so a replica's two workers both take their share)."""
    request = urllib.request.Request(
        url, data=body if method != "GET" else None, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Answer(int(response.status), response.headers, response.read())
    except urllib.error.HTTPError as error:
        return Answer(int(error.code), error.headers, error.read())


def _poll(probe: Callable[[], T | None], within: float, what: str) -> T:
    """probe() until it returns something truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.1)


def _counts(stack: Stack, upstream: str) -> dict[str, Any]:
    answer = _request(f"{stack.upstream_url(upstream)}/_demo/counts")
    assert answer.status == 200
    counts: dict[str, Any] = json.loads(answer.body)
    return counts


def _config(stack: Stack, replica: int) -> GatewayConfig:
    """config/compose.yaml as that replica loaded it."""
    return load_config(REPO / "config" / "compose.yaml", env=gateway_env(stack.ports, replica))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("stack"), Ports.free(), scrape_interval="1s")
    try:
        running.start()
        yield running
    finally:
        running.stop()  # also when start() or a test failed: nothing is left running


@pytest.mark.timeout(120)
def test_a_rate_limit_is_shared_by_both_replicas(stack: Stack) -> None:
    [limit] = [
        spec.config
        for route in _config(stack, 0).routes
        if route.name == "users"
        for spec in route.pipeline
        if spec.kind == "rate_limit"
    ]
    assert isinstance(limit, RateLimitConfig)
    assert limit.store == "shared"
    before = _counts(stack, "users")["executions"]
    # four times the burst, alternating the replicas: with a limit per replica each would
    # admit at least its own burst (2 x burst in all), with one per worker up to all of them
    statuses: dict[int, list[int]] = {0: [], 1: []}
    refusal: Answer | None = None
    started = time.monotonic()
    for i in range(4 * limit.burst):
        answer = _request(f"{stack.gateway_url(i % 2)}/users/profile")
        statuses[i % 2].append(answer.status)
        if answer.status == 429:
            refusal = answer
    elapsed = time.monotonic() - started
    executed = _counts(stack, "users")["executions"] - before

    everything = statuses[0] + statuses[1]
    assert set(everything) <= {200, 429}, everything
    admitted = everything.count(200)
    # counted by the upstream: every 200 ran there, no 429 did
    assert executed == admitted
    # one bucket for the whole stack: its burst, plus what refilled while the test ran
    assert 0 < admitted <= limit.burst + math.ceil(limit.rate * elapsed / limit.per), statuses
    # both replicas refused once the shared bucket was empty
    assert 429 in statuses[0]
    assert 429 in statuses[1]
    assert refusal is not None
    assert refusal.headers["Retry-After"]
    assert refusal.headers["RateLimit-Policy"]


@pytest.mark.timeout(120)
def test_an_idempotent_post_runs_once_and_the_other_replica_replays_it(stack: Stack) -> None:
    key = f"order-{secrets.token_hex(8)}"
    headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
    body = b'{"item": "book", "quantity": 1}'

    first = _request(f"{stack.gateway_url(0)}/orders", "POST", headers, body)
    assert first.status == 200
    assert first.headers["Idempotent-Replayed"] is None
    assert json.loads(first.body)["idempotency_key"] == key

    replayed = _request(f"{stack.gateway_url(1)}/orders", "POST", headers, body)
    assert replayed.status == 200
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.body == first.body  # the first execution's answer, number included
    # and replica 1 replays it too
    again = _request(f"{stack.gateway_url(0)}/orders", "POST", headers, body)
    assert again.headers["Idempotent-Replayed"] == "true"
    # the same key for another request is refused by the replica that did not run it
    other_body = _request(f"{stack.gateway_url(1)}/orders", "POST", headers, b'{"item": "pen"}')
    assert other_body.status == 422

    # a new key runs: the upstream's counter is live, and counted the first key once
    fresh = f"order-{secrets.token_hex(8)}"
    new = _request(f"{stack.gateway_url(1)}/orders", "POST", {"Idempotency-Key": fresh}, body)
    assert new.status == 200
    assert new.headers["Idempotent-Replayed"] is None
    by_key = _counts(stack, "orders")["by_idempotency_key"]
    assert by_key == {key: 1, fresh: 1}


@pytest.mark.timeout(120)
def test_a_trace_arrives_at_the_receiver(stack: Stack) -> None:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    answer = _request(
        f"{stack.gateway_url(1)}/orders/traced",
        headers={"traceparent": f"00-{trace_id}-{parent}-01"},
    )
    assert answer.status == 200

    def spans() -> list[dict[str, Any]] | None:
        found = [s for s in read_spans(stack.spans_file) if s["trace_id"] == trace_id]
        kinds = {s["kind"] for s in found}
        return found if {"SERVER", "CLIENT"} <= kinds else None

    # exported in batches every second (config/compose.yaml's batch.schedule_delay)
    found = _poll(spans, within=30, what=f"the spans of trace {trace_id}")
    [server] = [s for s in found if s["kind"] == "SERVER"]
    assert server["parent_span_id"] == parent  # the caller's sampled traceparent continued
    assert server["service"] == "gateway"
    assert server["attributes"]["gateway.route"] == "orders"
    assert server["attributes"]["http.response.status_code"] == 200
    [client] = [s for s in found if s["kind"] == "CLIENT"]
    assert client["parent_span_id"] == server["span_id"]
    assert client["attributes"]["gateway.upstream"] == "orders"


def _prometheus(stack: Stack, path: str) -> Any:
    answer = _request(f"{stack.prometheus_url}{path}")
    assert answer.status == 200, answer.body
    document = json.loads(answer.body)
    assert document["status"] == "success"
    return document["data"]


def _rule_names(path: Path, kind: str) -> set[str]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return {rule[kind] for group in groups for rule in group["rules"] if kind in rule}


@pytest.mark.timeout(120)
def test_prometheus_scrapes_both_replicas_with_every_alert_loaded(stack: Stack) -> None:
    expected = {f"127.0.0.1:{gateway.status}" for gateway in stack.ports.gateways}

    def up() -> set[str] | None:
        targets = _prometheus(stack, "/api/v1/targets")["activeTargets"]
        healthy = {
            t["labels"]["instance"]
            for t in targets
            if t["labels"]["job"] == "gateway" and t["health"] == "up"
        }
        return healthy if healthy == expected else None

    assert _poll(up, within=60, what="both status listeners scraped and up") == expected
    # what was scraped is the gateway's own metrics, from each replica
    series = _prometheus(stack, "/api/v1/query?query=count+by+(instance)(gateway_config_info)")
    assert {s["metric"]["instance"] for s in series["result"]} == expected

    groups = _prometheus(stack, "/api/v1/rules")["groups"]
    loaded = {(rule["type"], rule["name"]) for group in groups for rule in group["rules"]}
    alerts = _rule_names(REPO / "deploy" / "prometheus" / "alerts.yml", "alert")
    records = _rule_names(REPO / "deploy" / "prometheus" / "rules.yml", "record")
    assert alerts  # read from the file: a new alert is checked without editing this test
    assert {name for kind, name in loaded if kind == "alerting"} == alerts
    assert records <= {name for kind, name in loaded if kind == "recording"}
    assert all(group["file"].startswith(str(REPO / "deploy" / "prometheus")) for group in groups)


def _compose_healthcheck(service: str) -> tuple[list[str], int]:
    """docker-compose.yml's healthcheck command of `service` (CMD python -c ...) and the port
    it probes on the container's loopback."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    test = compose["services"][service]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    port = re.search(r"127\.0\.0\.1:(\d+)/", test[3])
    assert port is not None
    return list(test[2:]), int(port.group(1))


@pytest.mark.timeout(120)
def test_the_compose_healthchecks_pass_on_the_same_processes(stack: Stack) -> None:
    """The commands docker-compose.yml runs in the gateway and upstream containers, run here
    against the local stack's processes (their ports put in): healthy, and failing where
    nothing answers."""
    probes = {
        "gateway-1": stack.ports.gateways[0].status,
        "gateway-2": stack.ports.gateways[1].status,
        "users": stack.ports.users,
        "orders": stack.ports.orders,
    }
    for service, local_port in probes.items():
        args, compose_port = _compose_healthcheck(service)
        assert _run_probe(args, compose_port, local_port) == 0, service
        # a port nothing listens on
        assert _run_probe(args, compose_port, Ports.free().redis) != 0, service


def _run_probe(args: list[str], compose_port: int, port: int) -> int:
    """The healthcheck's `python -c ...` with the compose port replaced by `port`: its exit."""
    local = [arg.replace(f"127.0.0.1:{compose_port}/", f"127.0.0.1:{port}/") for arg in args]
    assert local != args
    done = subprocess.run([sys.executable, *local], capture_output=True, timeout=30, check=False)
    return done.returncode


@pytest.mark.timeout(180)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_the_launcher_leaves_no_process_behind(tmp_path: Path, signum: signal.Signals) -> None:
    """`python -m deploy.stack` stopped by Ctrl-C or SIGTERM stops every part it started and
    exits 0; killed outright, its children are told to stop by the parent-death signal."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "deploy.stack", "--free-ports", "--dir", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    state_file = tmp_path / "stack.json"
    pids: list[int] = []
    try:

        def started() -> bool:
            assert launcher.poll() is None, "the launcher exited before the stack was up"
            return state_file.exists()

        _poll(started, within=90, what="the stack to start")
        pids_by_name = json.loads(state_file.read_text())["pids"]
        pids = list(pids_by_name.values())
        # redis, two upstreams, the receiver, two gateways, prometheus
        assert len(alive(pids)) == 7
        # a gateway's process group holds its two workers too: they are stopped with it
        assert len(group_members(pids_by_name["gateway-1"])) == 3
        launcher.send_signal(signum)
        code = launcher.wait(timeout=90)
        output = launcher.stdout.read().decode(errors="replace") if launcher.stdout else ""
        if signum == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:
            assert code == 0, output
            assert output.rstrip().endswith("stopped"), output
        # the gateways drain first (drain_delay 5s): wait for the last group to go
        assert _poll(lambda: not alive(pids), within=60, what="every part to exit")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if launcher.stdout is not None:
            launcher.stdout.close()
        # only when the test failed: leave nothing behind either way
        for pid in alive(pids):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


@pytest.mark.timeout(60)
def test_a_failed_start_stops_what_it_started(tmp_path: Path) -> None:
    """A part that dies while the stack starts fails start() with its name and log, and what
    was already running is stopped: here the Python parts run on an interpreter that exits at
    once, after redis-server was up."""
    ports = Ports.free()
    stack = Stack(tmp_path, ports, python=shutil.which("false") or "/bin/false")
    with pytest.raises(StackError, match="users exited"):
        stack.start()
    assert "Ready to accept connections" in (tmp_path / "redis.log").read_text()
    assert stack.running() == []
    # redis-server is gone: nothing listens on its port any more
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", ports.redis))
        sock.listen()


@pytest.mark.timeout(30)
def test_ports_in_use_are_named_before_anything_starts(tmp_path: Path) -> None:
    ports = Ports.free()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports.redis))
        taken.listen()
        stack = Stack(tmp_path, ports)
        with pytest.raises(StackError, match=rf"redis \({ports.redis}\)"):
            stack.start()
    assert not (tmp_path / "redis.log").exists()
