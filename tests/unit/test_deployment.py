"""docker-compose.yml, checked by parsing and by Debian's `docker-compose config` (no Docker
engine here; tests/e2e/test_stack.py runs the same topology from local processes, and
tests/packaging follows the Dockerfile's steps)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config.model import GatewayConfig
from gateway.config.units import parse_duration
from gateway.stages.idempotency import IdempotencyConfig
from gateway.stages.rate_limit import RateLimitConfig
from tests.support.config import load_config

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
REPLICAS = ("gateway-1", "gateway-2")


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _services() -> dict[str, Any]:
    services: dict[str, Any] = _compose()["services"]
    return services


def _gateway_config() -> GatewayConfig:
    """config/compose.yaml as the containers load it: no variable set (the compose defaults)."""
    return load_config(REPO / "config" / "compose.yaml", env={})


def _docker_compose(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    assert binary is not None, "docker-compose is not installed: make test-deps installs it"
    # the caller's COMPOSE_* and the variables the file reads must not change what is validated
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    for name in ("GATEWAY_ADMIN_TOKEN", "REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        env.pop(name, None)
    return subprocess.run(
        [binary, "-f", "docker-compose.yml", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host path, container path, mode) of each short-syntax volume."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        mounts.append((source, target, mode[0] if mode else "rw"))
    return mounts


def test_docker_compose_accepts_the_file() -> None:
    done = _docker_compose("config", "-q")
    assert done.returncode == 0, done.stderr
    # and the file it resolves is ours: both replicas, each service's healthcheck
    resolved = yaml.safe_load(_docker_compose("config").stdout)
    assert set(resolved["services"]) == set(_services())
    assert all("healthcheck" in service for service in resolved["services"].values())


def test_docker_compose_rejects_a_broken_copy(tmp_path: Path) -> None:
    """The validator is not a rubber stamp: an unknown depends_on condition is refused."""
    broken = COMPOSE.read_text().replace("condition: service_healthy", "condition: healthy", 1)
    assert broken != COMPOSE.read_text()
    (tmp_path / "docker-compose.yml").write_text(broken)
    done = _docker_compose("config", "-q", cwd=tmp_path)
    assert done.returncode != 0
    assert "condition" in done.stderr


def test_compose_runs_two_gateway_replicas_of_two_workers_with_mounted_config() -> None:
    services = _services()
    assert {*REPLICAS, "redis", "users", "orders", "jaeger", "prometheus", "grafana"} <= set(
        services
    )
    for name in REPLICAS:
        service = services[name]
        assert service["build"] == "."
        command = service["command"]
        assert command[0] == "run"
        assert command[command.index("--workers") + 1] == "2"
        config = Path(command[command.index("-c") + 1])
        assert config == Path("/app/config/compose.yaml")
        assert ("./config", "/app/config", "ro") in _mounts(service)
        assert ("./certs", "/app/certs", "ro") in _mounts(service)
        assert (REPO / "config" / config.name).exists()


def test_compose_config_is_valid() -> None:
    config = _gateway_config()
    assert {r.name for r in config.routes} == {"users", "orders", "echo"}
    # probes and scraping on the status listener, the admin API on loopback only
    assert config.status is not None
    assert (config.status.host, config.status.port) == ("0.0.0.0", 9902)
    assert config.admin.host == "127.0.0.1"
    # the HTTPS listener's certificate comes from the mounted certs/
    assert any(f.endswith("/certs/server.crt") for f in config.files)


def test_compose_config_shares_a_limit_and_idempotency_records_through_redis() -> None:
    config = _gateway_config()
    services = _services()
    [store] = config.stores
    url = urlsplit(store.url)
    assert (store.type, url.hostname, url.port) == ("redis", "redis", 6379)
    assert "redis" in services
    stages = {
        (route.name, spec.kind): spec.config for route in config.routes for spec in route.pipeline
    }
    limit, idempotency = stages["users", "rate_limit"], stages["orders", "idempotency"]
    assert isinstance(limit, RateLimitConfig)
    assert isinstance(idempotency, IdempotencyConfig)
    assert limit.store == idempotency.store == store.name
    # a full Redis must refuse new locks, never evict one (a duplicate could then run)
    command = services["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_compose_config_traces_to_the_collector() -> None:
    tracing = _gateway_config().tracing
    assert tracing is not None
    assert (tracing.exporter, tracing.protocol) == ("otlp", "http/protobuf")
    url = urlsplit(tracing.endpoint)
    assert (url.hostname, url.port, url.path) == ("jaeger", 4318, "/v1/traces")
    assert "jaeger" in _services()


def test_every_service_has_a_healthcheck() -> None:
    for name, service in _services().items():
        test = service.get("healthcheck", {}).get("test")
        assert test, name
        assert test[0] in {"CMD", "CMD-SHELL"}, name


def test_gateway_healthcheck_is_readiness_on_the_status_listener() -> None:
    status = _gateway_config().status
    assert status is not None
    for name in REPLICAS:
        test = _services()[name]["healthcheck"]["test"]
        # the slim image has Python but no curl
        assert test[:3] == ["CMD", "python", "-c"]
        assert f"http://127.0.0.1:{status.port}/readyz" in test[3]


def test_depends_on_waits_for_health_where_there_is_one() -> None:
    services = _services()
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition["condition"] in {"service_healthy", "service_started"}
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
    for name in REPLICAS:
        depends = services[name]["depends_on"]
        for dependency in ("redis", "users", "orders"):
            assert depends[dependency] == {"condition": "service_healthy"}
        # a collector that is down costs spans, never requests
        assert depends["jaeger"] == {"condition": "service_started"}
    assert services["prometheus"]["depends_on"] == {
        name: {"condition": "service_healthy"} for name in REPLICAS
    }
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


def test_every_mount_is_read_only_and_exists() -> None:
    for name, service in _services().items():
        for source, _, mode in _mounts(service):
            assert mode == "ro", (name, source)
            assert source.startswith("./"), (name, source)  # from the repo, no named volume
            # certs/ is made by `make certs` (keys are never committed)
            if source != "./certs":
                assert (REPO / source).exists(), (name, source)


def test_stop_grace_period_is_longer_than_the_drain() -> None:
    shutdown = _gateway_config().shutdown
    for name in REPLICAS:
        grace = parse_duration(_services()[name]["stop_grace_period"], "stop_grace_period")
        assert grace > shutdown.drain_delay + shutdown.timeout


def test_published_ports_are_on_loopback() -> None:
    for name, service in _services().items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_prometheus_scrapes_every_replica_and_loads_the_rules() -> None:
    services = _services()
    prometheus = services["prometheus"]
    mounts = {target: source for source, target, _ in _mounts(prometheus)}
    config = yaml.safe_load((REPO / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    status = _gateway_config().status
    assert status is not None
    [job] = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": [f"{name}:{status.port}" for name in REPLICAS]}]
    # each rule file is in a mounted directory, and is the one deploy/prometheus holds
    rule_files = [Path(path) for path in config["rule_files"]]
    assert {path.name for path in rule_files} == {"rules.yml", "alerts.yml"}
    for path in rule_files:
        source = mounts[str(path.parent)]
        assert (REPO / source / path.name).exists()


def test_grafana_provisions_prometheus_and_the_dashboard() -> None:
    grafana = _services()["grafana"]
    mounts = {target: source for source, target, _ in _mounts(grafana)}
    provisioning = REPO / mounts["/etc/grafana/provisioning"]
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    ready = str(_services()["prometheus"]["healthcheck"]["test"])
    prometheus_port = re.search(r"127\.0\.0\.1:(\d+)/-/ready", ready)
    assert prometheus_port is not None
    assert (source["type"], source["url"]) == (
        "prometheus",
        f"http://prometheus:{prometheus_port.group(1)}",
    )
    assert source["isDefault"] is True  # the dashboard's datasource variable picks it
    [provider] = yaml.safe_load((provisioning / "dashboards" / "gateway.yml").read_text())[
        "providers"
    ]
    dashboard = Path(provider["options"]["path"]) / "gateway-dashboard.json"
    assert mounts[str(dashboard)] == "./deploy/grafana/gateway-dashboard.json"


@pytest.mark.parametrize("name", ["users", "orders"])
def test_demo_upstreams_are_the_local_stack_s(name: str) -> None:
    """The compose upstreams run deploy/stack/demo_upstream.py, as `make stack` does, on the
    port config/compose.yaml's upstream names."""
    service = _services()[name]
    endpoint = {u.name: u for u in _gateway_config().upstreams}[name].endpoints[0]
    assert ("./deploy/stack/demo_upstream.py", "/demo/demo_upstream.py", "ro") in _mounts(
        service
    )
    command = service["command"]
    assert command[command.index("--port") + 1] == str(urlsplit(endpoint.url).port)
    assert urlsplit(endpoint.url).hostname == name
