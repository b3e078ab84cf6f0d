"""bench.callgrind's own logic: which totals it reads, and what each route sends."""

from __future__ import annotations

from pathlib import Path

from bench.callgrind import _config, _request, _total_instructions
from bench.peers import OPERATOR_KEY, Tracing


def test_the_totals_line_counts_not_the_summary(tmp_path: Path) -> None:
    # instrumentation off at start: the summary is 0, the totals are what was measured
    out = tmp_path / "callgrind.out"
    out.write_text("version: 1\nevents: Ir\nsummary: 0\nfn=(1) f\n1 5\ntotals: 159174496\n")
    assert _total_instructions(out) == 159_174_496


def test_the_operator_route_sends_its_key_and_origin_and_has_its_stages() -> None:
    assert b"X-API-Key: " + OPERATOR_KEY.encode() in _request("operator")
    assert b"X-API-Key" not in _request("bare")
    assert "api_key" in _config("operator", 8080, 8081)
    assert "pipeline:" not in _config("bare", 8080, 8081)
    assert "circuit_breaker" in _config("pipeline", 8080, 8081)


def test_tracing_is_on_only_when_a_ratio_is_given() -> None:
    assert "tracing:" not in _config("bare", 8080, 8081)
    traced = _config("bare", 8080, 8081, Tracing(0.0, "http://127.0.0.1:8082/v1/traces"))
    assert "sample_ratio: 0.0, exporter: otlp" in traced
    assert 'endpoint: "http://127.0.0.1:8082/v1/traces"' in traced
