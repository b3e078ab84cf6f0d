"""Several `gateway run --workers 2` processes sharing stores, for end-to-end tests of what is
shared between replicas: each on a config of its own (its ports), started and waited for until
ready, and always stopped at the end (`Gateways.stop_all`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.config_builder import gateway_yaml, listener, route, upstream_to
from tests.support.process import GatewayProcess, async_wait_until, free_port, http_get


@dataclass(frozen=True)
class Setup:
    """One gateway's config file and the ports it binds."""

    path: Path
    http: int
    admin: int


class Gateways:
    def __init__(self, directory: Path, workers: int = 2) -> None:
        self.directory = directory
        self.workers = workers
        self.running: list[GatewayProcess] = []

    def config(
        self,
        name: str,
        upstream_url: str,
        pipeline: Sequence[Mapping[str, Any]],
        stores: Mapping[str, Any],
    ) -> Setup:
        """A config with one route on `upstream_url` through `pipeline`, and `stores`."""
        http, admin = free_port(), free_port()
        text = gateway_yaml(
            listeners=[listener(http)],
            admin={"bind": f"127.0.0.1:{admin}"},
            upstreams={"app": upstream_to(upstream_url)},
            routes=[route("app", "app", pipeline=list(pipeline))],
            stores=dict(stores),
        )
        path = self.directory / f"{name}.yaml"
        path.write_text(text)
        return Setup(path, http, admin)

    async def start(self, setup: Setup) -> int:
        """Start a gateway on `setup` and wait until it is ready: its http port."""
        self.running.append(
            GatewayProcess(setup.path, "--workers", str(self.workers), "--no-watch")
        )
        await async_wait_until(
            lambda: ready(setup.admin), within=30, what=f"{setup.path.name} ready"
        )
        return setup.http

    def stop_all(self) -> None:
        for gateway in self.running:
            gateway.stop()
        self.running = []


def ready(admin: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{admin}/readyz", timeout=1)[0] == 200
    except OSError:
        return False
