"""docker-compose.yml, checked by parsing (no Docker engine here); the Dockerfile is
tests/packaging's."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.support.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_compose_runs_two_gateway_replicas_with_mounted_config() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    replicas = [s for name, s in services.items() if name.startswith("gateway-")]
    assert len(replicas) == 2
    for service in replicas:
        assert service["build"] == "."
        assert "./config:/app/config:ro" in service["volumes"]
        assert "./certs:/app/certs:ro" in service["volumes"]
        config = service["command"][service["command"].index("-c") + 1]
        assert (REPO / "config" / Path(config).name).exists()
    assert {"users", "orders", "prometheus"} <= set(services)


def test_compose_config_is_valid() -> None:
    config = load_config(REPO / "config" / "compose.yaml", env={})
    assert {r.name for r in config.routes} == {"users", "orders", "echo"}
