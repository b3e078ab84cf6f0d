"""The slow-client attacks of issue 11 (defect 3), with the real tool, against a gateway process.

slowhttptest runs each attack — slow body (R-U-Dead-Yet), slow read, slow headers (slowloris) —
with hundreds of connections from 127.0.0.1 against the gateway on its default limits, in front
of one upstream whose pool holds 256 connections; meanwhile 75 ordinary requests from another
client (127.0.0.2) must all get 200, 95 % of them within 250 ms and every one within 5 s, and
the gateway's memory must stay bounded.  (The times allow for this machine, not the gateway: the
upstream shares two cores with the gateway, the attack tool and the probes, and while the
attack starts it pushes hundreds of 4 MiB responses; probed directly, it answers as late.  With
100 ms and 3 s, the slow-read run failed one run in three on an otherwise idle machine — the
95th percentile at 100-140 ms, on the code before issue 12 as on the code after it.)
The metrics then show which defence answered the attack, so a test cannot pass by the attack
silently failing to start.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.config_builder import gateway_yaml, listener, route, upstream_to
from tests.support.process import free_port, http_get, wait_until

REPO = Path(__file__).resolve().parents[2]
PROBES = 75
#: what one connection may cost while its client holds it: the transport's write buffer (64 KiB
#: high water) plus one read from the upstream (up to 256 KiB) for a stalled reader, or the
#: request buffer (64 KiB) for a slow upload — ~320 KiB; 500 connections, and the interpreter's
#: own growth, stay well within this
RSS_GROWTH_LIMIT_MIB = 200


@dataclass(frozen=True)
class Attack:
    args: tuple[str, ...]
    path: str
    #: a metric line (regex) whose value shows the defence at work, and its least value
    evidence: str
    at_least: float


ATTACKS = {
    "slow_body": Attack(
        ("-B", "-c", "500", "-i", "2", "-r", "200", "-s", "100000", "-t", "POST", "-x", "10"),
        "/upload",
        r'gateway_slow_clients_total\{listener="http",direction="upload"\} (\S+)',
        100,
    ),
    "slow_read": Attack(
        ("-X", "-c", "500", "-r", "200", "-w", "512", "-y", "1024", "-n", "5", "-z", "32"),
        "/big?size=4194304",
        r'gateway_upstream_evictions_total\{upstream="app"\} (\S+)',
        50,
    ),
    "slowloris": Attack(
        ("-H", "-c", "1000", "-i", "3", "-r", "200"),
        "/",
        r'gateway_connections_active\{listener="http"\} (\S+)',
        500,
    ),
}


@dataclass
class Setup:
    http: int
    admin: int
    gateway: subprocess.Popen[bytes]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _ready(admin: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{admin}/readyz")[0] == 200
    except OSError:
        return False  # not listening yet


def _metric(admin: int, pattern: str) -> float:
    _, text = http_get(f"http://127.0.0.1:{admin}/metrics")
    found = re.search(pattern, text.decode())
    return float(found.group(1)) if found else 0.0


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    if shutil.which("slowhttptest") is None:
        pytest.fail("slowhttptest is not installed: `make test-deps` installs it")
    upstream_port, http, admin = free_port(), free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        gateway_yaml(
            listeners=[listener(http)],
            admin={"bind": f"127.0.0.1:{admin}"},
            upstreams={"app": upstream_to(f"http://127.0.0.1:{upstream_port}")},
            routes=[route("app", "app")],
        )
    )
    log = (tmp_path / "gateway.log").open("wb")
    upstream = subprocess.Popen(
        [sys.executable, "-m", "bench.upstream", str(upstream_port), "100"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(config), "--no-watch"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: _ready(admin), what="the gateway is ready")
        yield Setup(http, admin, gateway)
    finally:
        for process in (gateway, upstream):
            process.send_signal(signal.SIGTERM)
        for process in (gateway, upstream):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        log.close()


async def _probe(port: int) -> tuple[int, float]:
    """One ordinary request on a new connection: (status, seconds)."""
    started = time.monotonic()
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0)), 5
    )
    try:
        writer.write(b"GET /small HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    return int(data.split(b" ", 2)[1]), time.monotonic() - started


def _probes(port: int, pid: int) -> tuple[list[tuple[int, float]], float]:
    """PROBES requests, one after another a tenth of a second apart; and the peak RSS seen."""

    async def run() -> tuple[list[tuple[int, float]], float]:
        results = []
        peak = 0.0
        for _ in range(PROBES):
            results.append(await _probe(port))
            peak = max(peak, _rss_mib(pid))
            await asyncio.sleep(0.1)  # pacing the probes over the attack, not waiting on it
        return results, peak

    return asyncio.run(run())


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_ordinary_requests_are_served_during_a_slow_attack(name: str, setup: Setup) -> None:
    attack = ATTACKS[name]
    baseline = _rss_mib(setup.gateway.pid)
    tool = subprocess.Popen(
        [
            "slowhttptest",
            *attack.args,
            "-l",
            "60",  # it stops by itself, should this test not stop it first
            "-p",
            "3",
            "-u",
            f"http://127.0.0.1:{setup.http}{attack.path}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # the attack holds its connections before the probes start
        wait_until(
            lambda: (
                _metric(setup.admin, r'gateway_connections_active\{listener="http"\} (\S+)') >= 200
            ),
            20.0,
            "the attack's connections",
        )
        results, peak = _probes(setup.http, setup.gateway.pid)
        evidence = _metric(setup.admin, attack.evidence)
    finally:
        tool.send_signal(signal.SIGINT)
        try:
            tool.wait(10)
        except subprocess.TimeoutExpired:
            tool.kill()
            tool.wait(5)
    statuses = [status for status, _ in results]
    times = sorted(seconds for _, seconds in results)
    assert statuses == [200] * PROBES, statuses
    assert times[int(PROBES * 0.95) - 1] < 0.25, f"95 % of probes within 250 ms: {times}"
    assert times[-1] < 5.0, f"every probe within 5 s: {times}"
    assert peak - baseline < RSS_GROWTH_LIMIT_MIB, f"RSS grew from {baseline} to {peak} MiB"
    assert evidence >= attack.at_least, f"{attack.evidence}: {evidence}"
