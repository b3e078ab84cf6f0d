"""bench.callgrind's own logic: which totals it reads, and what each route sends."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from bench.callgrind import (
    _cache_lines,
    _config,
    _request,
    _total_instructions,
    _totals,
    main,
)
from bench.peers import OPERATOR_KEY, Tracing
from bench.scenarios import s_time_client
from gateway.dev_certificates import init_dev_certificates


def test_the_totals_line_counts_not_the_summary(tmp_path: Path) -> None:
    # instrumentation off at start: the summary is 0, the totals are what was measured
    out = tmp_path / "callgrind.out"
    out.write_text("version: 1\nevents: Ir\nsummary: 0\nfn=(1) f\n1 5\ntotals: 159174496\n")
    assert _total_instructions(out) == 159_174_496


def test_with_the_cache_simulated_each_event_is_read_by_its_name(tmp_path: Path) -> None:
    out = tmp_path / "callgrind.out"
    out.write_text(
        "version: 1\ndesc: I1 cache: 65536 B, 64 B, 16-way associative\n"
        "desc: Timerange: Basic block 0 - 134128286\n"
        "events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw\nsummary: 0 0 0 0 0 0 0 0 0\n"
        "fn=(1) f\n1 5 1 1 1 0 0 0 0 0\n"
        "totals: 541190182 154708228 96980902 16920551 7226130 2260535 6574 5567 2649\n"
    )
    totals = _totals(out)
    assert (totals["Ir"], totals["I1mr"], totals["D1mr"], totals["DLmw"]) == (
        541_190_182,
        16_920_551,
        7_226_130,
        2_649,
    )
    assert _total_instructions(out) == 541_190_182
    assert _cache_lines(out) == ["I1 cache: 65536 B, 64 B, 16-way associative"]


def test_the_operator_route_sends_its_key_and_origin_and_has_its_stages() -> None:
    assert b"X-API-Key: " + OPERATOR_KEY.encode() in _request("operator")
    assert b"X-API-Key" not in _request("bare")
    assert "api_key" in _config("operator", 8080, 8081)
    assert "pipeline:" not in _config("bare", 8080, 8081)
    assert "circuit_breaker" in _config("pipeline", 8080, 8081)


def test_the_edge_route_is_the_pipeline_behind_jwt_and_sends_the_token() -> None:
    config = _config("edge", 8080, 8081)
    assert "jwt:" in config
    assert "jwks_file: jwks.json" in config
    assert "circuit_breaker" in config
    assert "jwt:" not in _config("pipeline", 8080, 8081)
    request = _request("edge", "Authorization: Bearer abc.def.ghi")
    assert b"\r\nAuthorization: Bearer abc.def.ghi\r\n" in request
    assert b"Authorization" not in _request("pipeline")


def test_tracing_is_on_only_when_a_ratio_is_given() -> None:
    assert "tracing:" not in _config("bare", 8080, 8081)
    traced = _config("bare", 8080, 8081, Tracing(0.0, "http://127.0.0.1:8082/v1/traces"))
    assert "sample_ratio: 0.0, exporter: otlp" in traced
    assert 'endpoint: "http://127.0.0.1:8082/v1/traces"' in traced


def test_tls_and_mtls_serve_the_route_over_https_with_the_runs_certificates(
    tmp_path: Path,
) -> None:
    plain = _config("bare", 8080, 8081)
    assert "tls:" not in plain
    tls = _config("bare", 8080, 8081, certs=str(tmp_path))
    assert f"{tmp_path}/server.crt" in tls
    assert 'min_version: "1.3"' in tls
    assert "client_ca" not in tls
    assert "mtls:" not in tls
    mtls = _config("edge", 8080, 8081, certs=str(tmp_path), mtls=True)
    assert f'client_ca: "{tmp_path}/ca.crt"' in mtls
    assert "mtls: {required: true}" in mtls
    assert "jwt:" in mtls


def test_the_load_trusts_the_runs_ca_and_presents_the_client_certificate_for_mtls(
    tmp_path: Path,
) -> None:
    init_dev_certificates(tmp_path, ["localhost", "127.0.0.1"])
    # the handshakes scenario's client, which the keep-alive load shares
    context = s_time_client(tmp_path, client_cert=True)
    assert context.verify_mode is ssl.CERT_REQUIRED
    [ca] = context.get_ca_certs()
    subject = [item for rdn in ca["subject"] for item in rdn]
    assert ("commonName", "gateway development CA") in subject
    # the client's key pair is read only for mtls: without it, plain TLS still works
    only_ca = tmp_path / "only-ca"
    only_ca.mkdir()
    (only_ca / "ca.crt").write_bytes((tmp_path / "ca.crt").read_bytes())
    assert s_time_client(only_ca, client_cert=False).get_ca_certs() == [ca]
    with pytest.raises(FileNotFoundError):
        s_time_client(only_ca, client_cert=True)


def test_handshakes_are_counted_only_over_tls(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--handshakes", "full"])
    assert exited.value.code == 2
    assert "--handshakes needs --tls or --mtls" in capsys.readouterr().err
