"""The `tracing:` section and a route's `tracing: {sample_ratio}` (SPEC §2)."""

from __future__ import annotations

import pytest

from gateway.config.model import GatewayConfig, TracingBatchConfig, TracingConfig
from gateway.errors import ConfigErrors
from tests.support.config import parse_config

ROUTES = """
listeners: [{name: http, bind: "127.0.0.1:8080"}]
upstreams:
  app: {endpoints: [{url: "http://127.0.0.1:9001"}]}
"""


def config_of(
    tracing: str = "", route_extra: str = "", env: dict[str, str] | None = None
) -> GatewayConfig:
    text = ROUTES + tracing + f"\nroutes:\n  - {{name: app, upstream: app{route_extra}}}\n"
    return parse_config(text, env=env or {})


def errors_of(tracing: str, route_extra: str = "") -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        config_of(tracing, route_extra)
    return [str(e) for e in info.value.errors]


def test_absent_section_is_tracing_off() -> None:
    config = config_of()
    assert config.tracing is None
    assert config.routes[0].trace_sample_ratio is None


def test_empty_section_takes_the_spec_defaults() -> None:
    tracing = config_of("tracing: {}").tracing
    assert tracing == TracingConfig()
    assert tracing is not None
    assert tracing.service_name == "gateway"
    assert (tracing.sample_ratio, tracing.exporter) == (0.01, "none")
    assert tracing.collector_url == "http://127.0.0.1:4318/v1/traces"


def test_every_field() -> None:
    text = """
tracing:
  service_name: edge
  sample_ratio: 0.25
  exporter: otlp
  protocol: grpc
  endpoint: https://collector.internal:4317
  headers: {x-api-key: "${OTLP_KEY}"}
  resource: {deployment.environment.name: prod, service.version: 7}
  timeout: 3s
  batch: {max_queue_size: 100, max_export_batch_size: 10, schedule_delay: 200ms}
"""
    tracing = config_of(text, env={"OTLP_KEY": "s3cret"}).tracing
    assert tracing == TracingConfig(
        service_name="edge",
        sample_ratio=0.25,
        exporter="otlp",
        protocol="grpc",
        endpoint="https://collector.internal:4317",
        headers=(("x-api-key", "s3cret"),),
        resource=(("deployment.environment.name", "prod"), ("service.version", "7")),
        timeout=3.0,
        batch=TracingBatchConfig(100, 10, 0.2),
    )


def test_grpc_default_endpoint() -> None:
    tracing = config_of("tracing: {protocol: grpc}").tracing
    assert tracing is not None
    assert tracing.collector_url == "http://127.0.0.1:4317"


@pytest.mark.parametrize(
    ("tracing", "expected"),
    [
        ("tracing: {sample_ratio: 2}", "tracing.sample_ratio: must be between 0 and 1"),
        ("tracing: {exporter: jaeger}", "tracing.exporter: must be none, console or otlp"),
        ("tracing: {protocol: http}", "tracing.protocol: must be http/protobuf or grpc"),
        ("tracing: {endpoint: collector:4318}", "tracing.endpoint: must be an http:// or"),
        ("tracing: {service_name: ' '}", "tracing.service_name: must not be empty"),
        ("tracing: {headers: {'bad name': x}}", "tracing.headers.bad name: is not a valid"),
        ("tracing: {headers: [a]}", "tracing.headers: must be a mapping"),
        ("tracing: {timeout: 0s}", "tracing.timeout: must be > 0"),
        ("tracing: {sampel_ratio: 1}", "tracing.sampel_ratio: unknown key (did you mean"),
        (
            "tracing: {batch: {max_queue_size: 10, max_export_batch_size: 20}}",
            "tracing.batch.max_export_batch_size: must not exceed max_queue_size",
        ),
        ("tracing: {batch: {max_queue_size: 0}}", "tracing.batch.max_queue_size: must be > 0"),
        ("tracing: 7", "tracing: must be a mapping"),
    ],
    ids=[
        "ratio",
        "exporter",
        "protocol",
        "endpoint",
        "service-name",
        "header-name",
        "headers-shape",
        "timeout",
        "typo",
        "batch-over-queue",
        "queue-zero",
        "not-mapping",
    ],
)
def test_errors_name_their_path(tracing: str, expected: str) -> None:
    errors = errors_of(tracing)
    assert any(e.startswith(expected) for e in errors), errors


def test_a_header_value_with_a_newline_is_refused_without_echoing_it() -> None:
    errors = errors_of('tracing: {headers: {authorization: "Bearer s3cret\\r\\nX: y"}}')
    assert errors == ["tracing.headers.authorization: must not contain CR, LF or NUL"]


@pytest.mark.parametrize(("ratio", "expected"), [("0", 0.0), ("0.5", 0.5), ("1", 1.0)])
def test_route_override_including_zero(ratio: str, expected: float) -> None:
    config = config_of("tracing: {}", f", tracing: {{sample_ratio: {ratio}}}")
    assert config.routes[0].trace_sample_ratio == expected


@pytest.mark.parametrize(
    ("tracing", "route_extra", "expected"),
    [
        ("", ", tracing: {sample_ratio: 0.5}", "routes[0].tracing: needs the top-level tracing"),
        ("tracing: {}", ", tracing: {sample_ratio: 3}", "routes[0].tracing.sample_ratio: must be"),
        ("tracing: {}", ", tracing: {}", "routes[0].tracing.sample_ratio: is required"),
        ("tracing: {}", ", tracing: {ratio: 1}", "routes[0].tracing.ratio: unknown key"),
    ],
    ids=["without-top-level", "out-of-range", "missing", "unknown-key"],
)
def test_route_override_errors(tracing: str, route_extra: str, expected: str) -> None:
    errors = errors_of(tracing, route_extra)
    assert any(e.startswith(expected) for e in errors), errors
