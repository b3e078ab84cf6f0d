"""Scenarios: what load, against which peers, compared how.  Add one by adding a `Scenario`."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.peers import PEERS
from bench.runner import (
    PROXY_CORE,
    Result,
    free_port,
    measured_pid,
    peak_rss_mib,
    running,
    wait_http,
    wrk_round,
)


@dataclass(frozen=True)
class Settings:
    rounds: int = 3
    seconds: float = 5.0
    connections: int = 50
    upstream_port: int = 0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    peers: tuple[str, ...]
    run: Callable[[Scenario, str, Settings], Result]
    #: gateway routes in the config (the measured request hits the last one)
    routes: int = 10
    path: str = "/"
    extra: dict[str, str] = field(default_factory=dict)


def wrk_scenario(scenario: Scenario, peer_name: str, settings: Settings) -> Result:
    """Start `peer_name`, warm it up, then `settings.rounds` wrk rounds against it."""
    peer = PEERS[peer_name]
    result = Result(peer=peer_name, scenario=scenario.name)
    if not peer.available():
        result.note = f"{peer.needs} not installed"
        return result
    port = free_port()
    with tempfile.TemporaryDirectory(prefix=f"bench-{peer_name}-") as scratch:
        launch = peer.build(Path(scratch), port, settings.upstream_port, scenario.routes)
        with running(launch.argv, PROXY_CORE, launch.env) as proc:
            wait_http(port)
            pid = measured_pid(proc)
            url = f"http://127.0.0.1:{port}{scenario.path}"
            wrk_round(pid, url, settings.connections, min(1.0, settings.seconds))  # warm-up
            for _ in range(settings.rounds):
                result.rounds.append(wrk_round(pid, url, settings.connections, settings.seconds))
            result.peak_rss_mib = peak_rss_mib(pid)
    return result


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="bare",
            description="bare route, 50 keep-alive connections, small body",
            peers=("gateway", "nginx", "haproxy", "caddy", "aiohttp"),
            run=wrk_scenario,
        ),
        Scenario(
            name="routes10k",
            description="the bare request with 10,000 routes in the gateway's table",
            peers=("gateway",),
            run=wrk_scenario,
            routes=10_000,
        ),
    )
}


def python() -> str:
    return sys.executable
