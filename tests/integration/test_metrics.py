"""Metrics that tell the truth (issue 14, item 7): what /metrics, read over the admin port, and
the access log say after requests over real sockets."""

from __future__ import annotations

import gc
import importlib.machinery
import json
import os
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

import gateway
from gateway.app import Gateway
from gateway.downstream import connection
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.faulty import closed_port
from tests.support.gateway import port_of, running_gateway
from tests.support.metrics import Samples, labelled, scrape, value, whole_milliseconds
from tests.support.raw import RawResponse, close_writer, exchange, open_raw, read_response
from tests.support.wire_upstream import wire_upstream

LOG_EVERY_REQUEST = {"enabled": True, "sample_ratio": 1.0}
GET = b"GET /app/x HTTP/1.1\r\nHost: a\r\n\r\n"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
#: two tries, a millisecond apart; retry_on as the default (connect_error, reset, 502-504)
TWICE = {"attempts": 2, "backoff": {"base": "1ms", "max": "2ms"}}


def _config(
    upstreams: Mapping[str, Sequence[str]],
    *,
    access_log: Mapping[str, Any] | None = None,
    pipeline: Sequence[Mapping[str, Any]] = (),
    **options: Any,
) -> str:
    """One route per upstream, `/<name>` to upstream `<name>` over `upstreams[name]` (URLs)."""
    timeouts = {"connect": "1s", "response_header": "2s"}
    return gateway_yaml(
        access_log=access_log,
        upstreams={n: upstream_to(*u, timeouts=timeouts, **options) for n, u in upstreams.items()},
        routes=[route(n, n, f"/{n}", pipeline=list(pipeline)) for n in upstreams],
    )


def _access_log(out: str, path: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("path") == path]


def _sent(response: RawResponse) -> int:
    """The bytes of a Content-Length response as the client read them."""
    return len(response.raw_head) + len(response.body)


async def test_sub_millisecond_requests_are_measured_in_microseconds(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """uvloop's loop.time() ticks in whole milliseconds: measured with it, a request answered in
    300 µs took 0 or 1 ms, and the sub-millisecond buckets said nothing."""
    requests = 3
    async with wire_upstream() as up:
        config = _config({"app": [up.url]}, access_log=LOG_EVERY_REQUEST)
        async with running_gateway(tmp_path, config) as gw:
            seen = await _timed_requests(port_of(gw), requests)
            samples = await scrape(gw)
            gw.snapshot.access_log.flush()
    # the in-process upstream answers at once: a request takes a fraction of a millisecond.
    # The gateway's measurements lie within the client's (one event loop: its clock starts after
    # the client's and stops before the client reads the answer), so every request the client
    # saw answered within 1 ms is in the 1 ms bucket, however busy the machine is
    within_1ms = sum(seconds < 0.001 for seconds in seen)
    assert within_1ms > 0, seen
    for name, labels in [
        ("gateway_request_duration_seconds", {"route": "app"}),
        ("gateway_upstream_request_duration_seconds", {"upstream": "app"}),
    ]:
        assert value(samples, f"{name}_count", **labels) == requests
        assert value(samples, f"{name}_bucket", le="0.001", **labels) >= within_1ms, seen
        total = value(samples, f"{name}_sum", **labels)
        assert 0 < total <= sum(seen)
        assert not whole_milliseconds(total), (name, total)
    # the warm-up connection, reused by every request: a loopback connect, in microseconds too
    connect = "gateway_upstream_connect_duration_seconds"
    assert value(samples, f"{connect}_count", upstream="app") == 1
    connect_sum = value(samples, f"{connect}_sum", upstream="app")
    assert connect_sum > 0
    assert not whole_milliseconds(connect_sum)
    logged = [x["duration_ms"] for x in _access_log(capfd.readouterr().out, "/app/x")]
    assert len(logged) == requests
    # (logged rounded to the microsecond)
    assert all(0 < ms < client * 1000 + 0.001 for ms, client in zip(logged, seen, strict=True))
    assert not all(float(ms).is_integer() for ms in logged), logged


async def _timed_requests(port: int, count: int) -> list[float]:
    """`count` GETs one after another on one connection: how long each took, as the client
    saw it (from before its first byte was written to its answer's last byte read)."""
    reader, writer = await open_raw(port)
    seen = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            writer.write(GET)
            response = await read_response(reader)
            seen.append(time.perf_counter() - started)
            assert response.status == 200
    finally:
        await close_writer(writer)
    return seen


async def test_request_and_response_bytes_are_the_access_logs(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    bodies = [b"", b"x" * 10, b"y" * 1000]
    async with wire_upstream() as up:
        config = _config({"app": [up.url]}, access_log=LOG_EVERY_REQUEST)
        async with running_gateway(tmp_path, config) as gw:
            port = port_of(gw)
            answers = [
                await exchange(
                    port,
                    b"POST /app/x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%b"
                    % (len(body), body),
                )
                for body in bodies
            ]
            unrouted = await exchange(port, b"GET /elsewhere HTTP/1.1\r\nHost: a\r\n\r\n")
            samples = await scrape(gw)
            gw.snapshot.access_log.flush()
    assert [r.status for r in answers] == [200, 200, 200]
    assert unrouted.status == 404
    assert [r.body for r in up.requests] == bodies
    sent = sum(_sent(r) for r in answers)
    assert value(samples, "gateway_request_bytes_total", route="app") == 1010
    assert value(samples, "gateway_response_bytes_total", route="app") == sent
    # a request that matches no route counts with route="", as in gateway_requests_total
    assert value(samples, "gateway_request_bytes_total", route="") == 0
    assert value(samples, "gateway_response_bytes_total", route="") == _sent(unrouted)
    logged = _access_log(capfd.readouterr().out, "/app/x")
    assert sum(x["bytes_in"] for x in logged) == 1010
    assert sum(x["bytes_out"] for x in logged) == sent


def _by_class(samples: Samples, upstream: str) -> dict[str, float]:
    rows = labelled(samples, "gateway_upstream_responses_total")
    return {dict(k)["class"]: v for k, v in rows.items() if dict(k)["upstream"] == upstream}


async def test_upstream_responses_are_counted_by_status_class(tmp_path: Path) -> None:
    async with wire_upstream() as up, running_gateway(tmp_path, _config({"app": [up.url]})) as gw:
        up.answers.extend([NOT_FOUND, NOT_FOUND])
        statuses = [(await exchange(port_of(gw), GET)).status for _ in range(3)]
        samples = await scrape(gw)
    assert statuses == [404, 404, 200]
    assert _by_class(samples, "app") == {"1xx": 0, "2xx": 1, "3xx": 0, "4xx": 2, "5xx": 0}


async def test_retries_are_counted_by_reason_and_every_try_by_its_response(
    tmp_path: Path,
) -> None:
    """A 503 then a 200 on one upstream (reason "status"), and an upstream that refuses every
    connection (reason "connect_error"): one retry each, two tries each."""
    async with wire_upstream() as up:
        dead = f"http://127.0.0.1:{closed_port()}"
        config = _config({"app": [up.url], "dead": [dead]}, pipeline=[{"retry": TWICE}])
        async with running_gateway(tmp_path, config) as gw:
            up.answers.append(UNAVAILABLE)
            retried = await exchange(port_of(gw), GET)
            refused = await exchange(port_of(gw), b"GET /dead HTTP/1.1\r\nHost: a\r\n\r\n")
            samples = await scrape(gw)
    assert (retried.status, retried.body) == (200, b"ok")
    assert refused.status == 502
    assert len(up.requests) == 2
    assert labelled(samples, "gateway_retries_total") == {
        (("reason", "status"), ("route", "app"), ("upstream", "app")): 1,
        (("reason", "connect_error"), ("route", "dead"), ("upstream", "dead")): 1,
    }
    # each try's response head is counted, the retried one too; a refused connect has none
    assert _by_class(samples, "app") == {"1xx": 0, "2xx": 1, "3xx": 0, "4xx": 0, "5xx": 1}
    assert set(_by_class(samples, "dead").values()) == {0}


async def test_an_outlier_ejection_is_counted_once(tmp_path: Path) -> None:
    detection = {"consecutive_failures": 2, "ejection": "10s", "max_ejected_percent": 50}
    async with wire_upstream() as bad, wire_upstream() as good:
        bad.response = UNAVAILABLE
        config = _config({"app": [bad.url, good.url]}, outlier_detection=detection)
        async with running_gateway(tmp_path, config) as gw:
            # round robin: two of the first four go to `bad`, and its second failure ejects it;
            # the next four all go to `good`
            statuses = [(await exchange(port_of(gw), GET)).status for _ in range(8)]
            assert gw.snapshot.upstreams["app"].endpoints[0].ejected
            samples = await scrape(gw)
        endpoints = {"bad": f"127.0.0.1:{bad.port}", "good": f"127.0.0.1:{good.port}"}
    assert sorted(statuses) == [200] * 6 + [503] * 2
    assert (len(bad.requests), len(good.requests)) == (2, 6)
    assert labelled(samples, "gateway_outlier_ejections_total") == {
        (("endpoint", endpoints["bad"]), ("upstream", "app")): 1,
        (("endpoint", endpoints["good"]), ("upstream", "app")): 0,
    }


async def test_build_info_names_version_python_and_compilation(tmp_path: Path) -> None:
    async with wire_upstream() as up, running_gateway(tmp_path, _config({"app": [up.url]})) as gw:
        samples = await scrape(gw)
    # whether the hot path runs compiled: is the server protocol loaded from an extension?
    compiled = connection.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    python = ".".join(str(n) for n in sys.version_info[:3])
    assert labelled(samples, "gateway_build_info") == {
        (
            ("compiled", "true" if compiled else "false"),
            ("python", python),
            ("version", gateway.__version__),
        ): 1
    }


def _start_time() -> float:
    """This process's start (Unix time), as the kernel says: /proc/self/stat's starttime in
    clock ticks after boot, and the boot time in /proc/stat."""
    with open("/proc/self/stat") as f:
        ticks = float(f.read().rpartition(")")[2].split()[19])
    with open("/proc/stat") as f:
        boot = next(float(x.split()[1]) for x in f if x.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="the process metrics need /proc")
async def test_process_metrics_are_this_process(tmp_path: Path) -> None:
    """The gateway runs in the test's own process, so what /metrics reports is checked against
    what the kernel says of the test process."""
    tick = 1 / os.sysconf("SC_CLK_TCK")
    async with wire_upstream() as up, running_gateway(tmp_path, _config({"app": [up.url]})) as gw:
        before = os.times()
        samples = await scrape(gw)
        after = os.times()
        # descriptors come and go with every connection, the scrape's own too: rendered
        # in-process, /metrics counts exactly what is open (os.listdir's own descriptor as
        # well, like the collector's), with and without 10 pipes (20 descriptors) more
        open_fds = [_open_fds(gw, pipes) for pipes in (0, 10)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cpu = value(samples, "process_cpu_seconds_total")
    assert before.user + before.system - tick <= cpu <= after.user + after.system + tick
    assert 0 < value(samples, "process_resident_memory_bytes") <= peak
    assert value(samples, "process_open_fds") > 0
    assert abs(value(samples, "process_start_time_seconds") - _start_time()) < 0.01
    assert open_fds[0][0] == open_fds[0][1]
    assert open_fds[1][0] == open_fds[1][1]


def _open_fds(gw: Gateway, pipes: int) -> tuple[float, int]:
    """process_open_fds as /metrics renders it, and the descriptors /proc/self/fd lists, with
    `pipes` more pipes open; nothing runs on the loop in between, and no garbage collection
    (which may close a socket object an earlier test dropped)."""
    gc.collect()
    gc.disable()
    opened = [os.pipe() for _ in range(pipes)]
    try:
        text = gw.metrics_text()
        listed = len(os.listdir("/proc/self/fd"))
    finally:
        gc.enable()
        for r, w in opened:
            os.close(r)
            os.close(w)
    line = next(x for x in text.splitlines() if x.startswith("process_open_fds "))
    return float(line.split()[1]), listed
