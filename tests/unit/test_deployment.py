"""docker-compose.yml and the Dockerfile, checked by parsing (no Docker engine here)."""

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


def test_dockerfile_runs_as_non_root() -> None:
    lines = (REPO / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users
    assert users[-1] not in {"root", "0"}
    assert any(line.startswith("ENTRYPOINT") and "gateway" in line for line in lines)


def test_image_has_the_certificates_its_default_config_references() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    config = (REPO / "config" / "gateway.yaml").read_text()
    assert "../certs/server.crt" in config
    assert "gateway certs init --out /app/certs" in dockerfile
    # written before dropping privileges, then handed to the runtime user
    assert dockerfile.index("certs init") < dockerfile.index("USER gateway")
