"""bench/ runs end to end on tiny scenarios (it reports numbers; nothing here asserts a speed),
and the edge and tracing scenarios' configs, token and OTLP receiver work with the gateway."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from bench.headers import REQUEST_HEADERS, RESPONSE_HEADERS
from bench.otlp_sink import Sink, counts, endpoint
from bench.peers import PEERS, Context
from bench.runner import (
    Result,
    Round,
    collect,
    free_port,
    misread,
    parse_s_time,
    wait_http,
)
from bench.scenarios import answers_with, bench_certificates, together_cpu_ratio, together_ratio
from bench.tokens import Credentials, mint
from tests.integration.conftest import Seen
from tests.support.config import load_config
from tests.support.gateway import port_of, running_gateway
from tests.support.raw import exchange

REPO = Path(__file__).resolve().parents[2]


def run_bench(
    out: Path, scenario: str, *peers: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`python -m bench` on one scenario and the peers named, one short round of 4 connections."""
    chosen = [arg for peer in peers for arg in ("--peer", peer)]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--scenario",
            scenario,
            *chosen,
            "--rounds",
            "1",
            "--seconds",
            "1",
            "--connections",
            "4",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_bench_runs_a_tiny_scenario(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "bare", "gateway")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| bare | gateway |" in result.stdout
    [report_file] = tmp_path.glob("bench-*.json")
    report = json.loads(report_file.read_text())
    assert report["machine"]["cores"] >= 1
    assert {"wrk", "python"} <= set(report["tools"])
    by_peer = {r["peer"]: r for r in report["results"]}
    gateway = by_peer["gateway"]
    assert gateway["scenario"] == "bare"
    assert len(gateway["rounds"]) == 1
    assert gateway["rounds"][0]["requests"] > 0
    assert gateway["errors"] == 0
    assert gateway["cpu_us_per_request"] > 0
    assert gateway["peak_rss_mib"] > 0
    assert by_peer["upstream (direct)"]["rounds"][0]["requests"] > 0


def test_edge_scenario_runs_with_its_token_and_receiver(tmp_path: Path) -> None:
    """The edge peer alone, tiny: wrk's token is accepted (no errors) and spans reach the
    scenario's OTLP receiver (~1 % of requests, two spans each)."""
    result = run_bench(tmp_path, "edge", "gateway+edge")
    assert result.returncode == 0, result.stderr[-2000:]
    [report_file] = tmp_path.glob("bench-*.json")
    edge = {r["peer"]: r for r in json.loads(report_file.read_text())["results"]}["gateway+edge"]
    assert edge["scenario"] == "edge"
    assert edge["note"] == ""
    assert edge["rounds"][0]["requests"] > 0
    assert edge["errors"] == 0  # a 401 would be a non-2xx answer
    assert edge["spans_received"] > 0
    assert 0 < edge["spans_per_100_requests"] < 10


def test_redis_scenario_limits_through_a_live_redis(tmp_path: Path) -> None:
    """The memory and redis limiting peers, tiny: no refusal at this rate, the redis peer's
    leases counted by Redis itself, and its req/s as a ratio to the memory peer's."""
    result = run_bench(tmp_path, "redis", "gateway+limit", "gateway+redis-limit", timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    [report_file] = tmp_path.glob("bench-*.json")
    by_peer = {r["peer"]: r for r in json.loads(report_file.read_text())["results"]}
    memory, shared = by_peer["gateway+limit"], by_peer["gateway+redis-limit"]
    for peer in (memory, shared):
        assert peer["note"] == ""
        assert peer["errors"] == 0  # a 429 or a 503 would be a non-2xx answer
        assert peer["rounds"][0]["requests"] > 0
    # at least the first lease, and far fewer than one per request
    assert 0 < shared["redis_round_trips_per_1000_requests"] < 100
    expected = shared["rounds_together"][0]["rps"] / memory["rounds_together"][0]["rps"]
    assert shared["x_memory_together"] == round(expected, 2)


def test_tracing_scenario_runs_peers_together_on_one_core(tmp_path: Path) -> None:
    """Two peers, tiny: after the interleaved rounds, a round with both loaded at once, and
    the traced peer's req/s as a ratio to tracing off's in that same round."""
    result = run_bench(tmp_path, "tracing", "gateway", "gateway+unsampled", timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    [report_file] = tmp_path.glob("bench-*.json")
    by_peer = {r["peer"]: r for r in json.loads(report_file.read_text())["results"]}
    off, unsampled = by_peer["gateway"], by_peer["gateway+unsampled"]
    for peer in (off, unsampled):
        assert len(peer["rounds_together"]) == 1
        assert peer["rounds_together"][0]["requests"] > 0
    expected = unsampled["rounds_together"][0]["rps"] / off["rounds_together"][0]["rps"]
    assert unsampled["x_tracing_off_together"] == round(expected, 2)


def test_tls_scenario_runs_the_gateway_and_nginx_over_https(tmp_path: Path) -> None:
    """The gateway and nginx with the scenario's certificates, tiny: wrk's HTTPS requests are
    answered (no errors) by both, and the gateway's req/s is a ratio to nginx's."""
    result = run_bench(tmp_path, "tls", "gateway+tls", "nginx+tls", timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    [report_file] = tmp_path.glob("bench-*.json")
    by_peer = {r["peer"]: r for r in json.loads(report_file.read_text())["results"]}
    gateway, nginx = by_peer["gateway+tls"], by_peer["nginx+tls"]
    for peer in (gateway, nginx):
        assert peer["note"] == ""
        assert peer["errors"] == 0
        assert peer["rounds"][0]["requests"] > 0
    expected = gateway["rounds"][0]["rps"] / nginx["rounds"][0]["rps"]
    assert gateway["x_nginx_tls"] == round(expected, 2)


def test_handshakes_scenario_measures_new_and_resumed_tls_connections(tmp_path: Path) -> None:
    """The gateway and nginx over TLS and the gateway asking for a client certificate, tiny:
    every peer's full and resumed rows have connections (every one resumed on the resumed rows)
    that read the checked 200's size, and the gateway's rate is a ratio to nginx's in the same
    mode — none for the mTLS peer, which only nginx+mtls would be compared to."""
    result = run_bench(tmp_path, "handshakes", "gateway+tls", "nginx+tls", "gateway+mtls")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| handshakes | gateway+mtls (resumed) |" in result.stdout
    [report_file] = tmp_path.glob("bench-*.json")
    by_peer = {r["peer"]: r for r in json.loads(report_file.read_text())["results"]}
    for peer in ("gateway+tls", "nginx+tls", "gateway+mtls"):
        for mode in ("full", "resumed"):
            row = by_peer[f"{peer} ({mode})"]
            assert row["scenario"] == "handshakes"
            assert row["note"] == ""
            assert row["errors"] == 0
            assert row["rounds"][0]["requests"] > 0
            assert row["connections_per_s"] > 0
            assert row["cpu_us_per_connection"] > 0
            if mode == "resumed":
                assert row["resumed_percent"] == 100
            else:
                assert "resumed_percent" not in row
    for mode in ("full", "resumed"):
        gateway, nginx = by_peer[f"gateway+tls ({mode})"], by_peer[f"nginx+tls ({mode})"]
        expected = gateway["rounds"][0]["rps"] / nginx["rounds"][0]["rps"]
        assert gateway["x_nginx"] == round(expected, 2)
        assert nginx["x_nginx"] == 1.0
        assert "x_nginx" not in by_peer[f"gateway+mtls ({mode})"]


#: `openssl s_time -www / -new -time 1` (OpenSSL 3.0.19) against nginx+tls, as printed
S_TIME_NEW = (
    "Collecting connection statistics for 1 seconds\n" + "*" * 573 + "\n\n"
    "573 connections in 0.66s; 868.18 connections/user sec, bytes read 88815\n"
    "573 connections in 2 real seconds, 155 bytes read per connection\n"
)
#: the same with -reuse: every connection resumed ("r")
S_TIME_REUSE = (
    "\n\nNow timing with session id reuse.\nstarting\n" + "r" * 1233 + "\n\n"
    "1233 connections in 0.75s; 1644.00 connections/user sec, bytes read 191115\n"
    "1233 connections in 2 real seconds, 155 bytes read per connection\n"
)
#: -reuse against `openssl s_server -www -num_tickets 0`: no ticket, so none resumed ("*")
S_TIME_NO_TICKETS = (
    "\n\nNow timing with session id reuse.\nstarting\n" + "*" * 1165 + "\n\n"
    "1165 connections in 0.83s; 1403.61 connections/user sec, bytes read 5935675\n"
    "1165 connections in 2 real seconds, 5095 bytes read per connection\n"
)
#: -new against haproxy+mtls without -cert: the handshakes complete on the client's side
#: (TLS 1.3), then the server refuses the certificate and nothing is read
S_TIME_REFUSED = (
    "Collecting connection statistics for 1 seconds\n" + "*" * 925 + "\n\n"
    "925 connections in 0.99s; 934.34 connections/user sec, bytes read 0\n"
    "925 connections in 2 real seconds, 0 bytes read per connection\n"
)


def test_s_time_output_parsed_into_connections_bytes_and_resumptions() -> None:
    new = parse_s_time(S_TIME_NEW)
    assert (new.connections, new.bytes_read, new.resumed) == (573, 88815, 0)
    reuse = parse_s_time(S_TIME_REUSE)
    assert (reuse.connections, reuse.bytes_read, reuse.resumed) == (1233, 191115, 1233)
    no_tickets = parse_s_time(S_TIME_NO_TICKETS)
    assert (no_tickets.connections, no_tickets.resumed) == (1165, 0)
    # two connections in no user time: s_time prints "inf" connections/user sec
    tiny = parse_s_time(
        "Collecting connection statistics for 1 seconds\n**\n\n"
        "2 connections in 0.00s; inf connections/user sec, bytes read 466\n"
        "2 connections in 6 real seconds, 233 bytes read per connection\n"
    )
    assert (tiny.connections, tiny.bytes_read) == (2, 466)
    with pytest.raises(ValueError, match="no totals"):
        parse_s_time("Collecting connection statistics for 1 seconds\n")


def test_s_time_answers_of_the_wrong_size_are_errors() -> None:
    refused = parse_s_time(S_TIME_REFUSED)
    assert misread(refused.connections, refused.bytes_read, 155) == 925
    new = parse_s_time(S_TIME_NEW)
    assert misread(new.connections, new.bytes_read, 155) == 0
    # the gateway's request ids grow by a digit now and then: a few bytes are not an error
    assert misread(100, 100 * 188, 186) == 0
    # a 502 is about twice the 200's size
    assert misread(100, 100 * 391, 186) == 100


def test_tls_peers_serve_https_only_with_the_scenarios_certificates(tmp_path: Path) -> None:
    with bench_certificates() as certs:
        PEERS["gateway+tls"].build(tmp_path, 8443, 9000, 10, Context(certs=certs))
        config = load_config(tmp_path / "gateway.yaml")
    [listener] = config.listeners
    assert listener.tls is not None
    assert listener.tls.min_version == "1.3"
    with pytest.raises(RuntimeError, match="needs the scenario's certificates"):
        PEERS["gateway+tls"].build(tmp_path, 8443, 9000, 10, Context())


def test_large_headers_scenario_sends_40_headers_and_gets_20_back(tmp_path: Path) -> None:
    """The gateway and nginx, tiny: wrk's 40-header requests are answered without errors, the
    rounds run together too."""
    assert len(REQUEST_HEADERS) == 40
    result = run_bench(tmp_path, "large-headers", "gateway", "nginx", timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    [report_file] = tmp_path.glob("bench-*.json")
    by_peer = {r["peer"]: r for r in json.loads(report_file.read_text())["results"]}
    gateway = by_peer["gateway"]
    assert gateway["scenario"] == "large-headers"
    assert gateway["errors"] == 0
    assert gateway["rounds"][0]["requests"] > 0
    expected = gateway["rounds_together"][0]["rps"] / by_peer["nginx"]["rounds_together"][0]["rps"]
    assert gateway["x_nginx_together"] == round(expected, 2)


async def test_the_built_in_upstream_answers_headers_with_the_scenarios_fifteen() -> None:
    port = free_port()
    upstream = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.upstream", str(port), cwd=REPO
    )
    try:
        await asyncio.to_thread(wait_http, port)
        response = await exchange(port, b"GET /headers HTTP/1.1\r\nHost: bench\r\n\r\n")
    finally:
        upstream.terminate()
        await upstream.wait()
    assert response.status == 200
    for name, value in RESPONSE_HEADERS:
        assert response.header(name) == value, name


def test_workers_scenario_counts_the_cpu_of_every_worker(tmp_path: Path) -> None:
    """Two gateway workers on both cores, tiny: answered without errors, and the CPU per
    request is the workers' (the supervisor that was started does next to nothing itself)."""
    result = run_bench(tmp_path, "workers", "gateway+workers2", timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    [report_file] = tmp_path.glob("bench-*.json")
    by_peer = {r["peer"]: r for r in json.loads(report_file.read_text())["results"]}
    workers = by_peer["gateway+workers2"]
    assert workers["note"] == ""
    assert workers["errors"] == 0
    assert workers["rounds"][0]["requests"] > 0
    # a proxied request costs the gateway well over 5 µs; the supervisor alone would be ~0
    assert workers["cpu_us_per_request"] > 5


def test_edge_tls_scenario_presents_the_client_certificate_through_its_front(
    tmp_path: Path,
) -> None:
    """The edge over TLS and nginx with client certificates, tiny: every request is answered
    2xx (a missing certificate would be 403 from the mtls stage, 400 from nginx), spans reach
    the receiver, and the cost ratio to nginx is reported."""
    result = run_bench(tmp_path, "edge-tls", "gateway+edge-tls", "nginx+mtls", timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    [report_file] = tmp_path.glob("bench-*.json")
    by_peer = {r["peer"]: r for r in json.loads(report_file.read_text())["results"]}
    edge, nginx = by_peer["gateway+edge-tls"], by_peer["nginx+mtls"]
    for peer in (edge, nginx):
        assert peer["note"] == ""
        assert peer["errors"] == 0
        assert peer["rounds"][0]["requests"] > 0
    assert edge["spans_received"] > 0
    expected = nginx["rounds"][0]["cpu_us_per_request"] / edge["rounds"][0]["cpu_us_per_request"]
    assert abs(edge["x_nginx_mtls_cpu"] - expected) < 0.01


def test_the_edge_tls_peer_requires_a_client_certificate_first(tmp_path: Path) -> None:
    credentials = mint()
    with bench_certificates() as certs:
        context = Context(jwks=credentials.jwks, otlp_endpoint=endpoint(4318), certs=certs)
        PEERS["gateway+edge-tls"].build(tmp_path, 8443, 9000, 10, context)
        config = load_config(tmp_path / "gateway.yaml")
    [listener] = config.listeners
    assert listener.tls is not None
    assert listener.tls.client_ca is not None
    [measured] = [r for r in config.routes if r.name == "app"]
    kinds = [stage.kind for stage in measured.pipeline]
    assert kinds == ["mtls", "jwt", "rate_limit", "circuit_breaker", "retry", "headers"]


def test_mtls_peers_ask_for_the_bench_clients_certificate(tmp_path: Path) -> None:
    """The handshakes scenario's mTLS peers: the gateway's listener trusts the bench's CA and
    its route requires a certificate; nginx, HAProxy and Caddy require one at the handshake."""
    with bench_certificates() as certs:
        for name in ("gateway+mtls", "nginx+mtls", "haproxy+mtls", "caddy+mtls"):
            scratch = tmp_path / name
            scratch.mkdir()
            assert PEERS[name].tls
            assert PEERS[name].mtls
            PEERS[name].build(scratch, 8443, 9000, 10, Context(certs=certs))
        config = load_config(tmp_path / "gateway+mtls" / "gateway.yaml")
    [listener] = config.listeners
    assert listener.tls is not None
    assert listener.tls.client_ca == f"{certs}/ca.crt"
    [measured] = [r for r in config.routes if r.name == "app"]
    assert [stage.kind for stage in measured.pipeline] == ["mtls"]
    nginx = (tmp_path / "nginx+mtls" / "nginx.conf").read_text()
    assert f"ssl_client_certificate {certs}/ca.crt;" in nginx
    assert "ssl_verify_client on;" in nginx
    haproxy = (tmp_path / "haproxy+mtls" / "haproxy.cfg").read_text()
    assert f"ca-file {certs}/ca.crt verify required" in haproxy
    caddy = (tmp_path / "caddy+mtls" / "Caddyfile").read_text()
    assert "mode require_and_verify" in caddy
    assert f"trusted_ca_cert_file {certs}/ca.crt" in caddy


def test_together_ratio_pairs_rounds_and_takes_the_median() -> None:
    def result(*rps: float) -> Result:
        return Result(peer="p", scenario="s", together=[Round(1, r, 0, 0, 0, 0) for r in rps])

    # a slow round slows both: paired, it cannot drag the ratio as it drags each median
    mine, reference = result(90, 45, 95), result(100, 50, 100)
    assert together_ratio(mine, reference) == 0.9
    assert together_ratio(result(), reference) == 0.0


def test_together_cpu_ratio_pairs_rounds_and_is_the_references_cost_over_the_peers() -> None:
    def result(*cpu: float) -> Result:
        return Result(peer="p", scenario="s", together=[Round(1, 1, 0, 0, c, 0) for c in cpu])

    mine, reference = result(20, 40, 25), result(18, 30, 20)
    assert together_cpu_ratio(mine, reference) == 0.8  # 0.9, 0.75, 0.8
    assert together_cpu_ratio(result(), reference) == 0.0
    assert together_cpu_ratio(result(0, 20), result(18, 19)) == 0.95  # a round with no cost


def _edge_config(
    directory: Path, upstream_port: int, collector: str, ratio: float
) -> tuple[str, Credentials]:
    """The edge peer's config as its launcher writes it (JWKS included), listening on port 0,
    tracing at `ratio`; and the credentials the scenario would send."""
    credentials = mint()
    PEERS["gateway+edge"].build(
        directory, 0, upstream_port, 10, Context(jwks=credentials.jwks, otlp_endpoint=collector)
    )
    text = (directory / "gateway.yaml").read_text()
    assert (directory / "jwks.json").read_bytes() == credentials.jwks
    assert "sample_ratio: 0.01," in text
    return text.replace("sample_ratio: 0.01,", f"sample_ratio: {ratio},"), credentials


def test_scenario_configs_parse(tmp_path: Path) -> None:
    credentials = mint()
    context = Context(jwks=credentials.jwks, otlp_endpoint=endpoint(4318))
    for name, ratio, stages in [
        ("gateway+edge", 0.01, ["jwt", "rate_limit", "circuit_breaker", "retry", "headers"]),
        ("gateway+traced", 0.01, []),
        ("gateway+unsampled", 0.0, []),
        ("gateway", None, []),
    ]:
        scratch = tmp_path / name
        scratch.mkdir()
        PEERS[name].build(scratch, 8080, 9000, 10, context)
        config = load_config(scratch / "gateway.yaml")
        [measured] = [r for r in config.routes if r.name == "app"]
        assert [stage.kind for stage in measured.pipeline] == stages, name
        if ratio is None:
            assert config.tracing is None
        else:
            assert config.tracing is not None
            assert config.tracing.sample_ratio == ratio
            assert config.tracing.exporter == "otlp"
            assert config.tracing.endpoint == "http://127.0.0.1:4318/v1/traces"
            assert config.tracing.service_name == name
    for name in ("gateway+edge", "gateway+traced"):
        with pytest.raises(RuntimeError, match="needs the scenario's"):
            PEERS[name].build(tmp_path, 8080, 9000, 10, Context())


async def test_bench_token_accepted_and_spans_counted(
    tmp_path: Path, upstream: tuple[TestServer, Seen]
) -> None:
    """The edge route in-process: the bench's token passes its jwt stage (the scenario's own
    pre-flight check agrees), a missing or foreign token is 401, and the bench receiver counts
    the spans the gateway exports (every request sampled here)."""
    server, _ = upstream
    sink = Sink()
    collector = TestServer(sink.app(), host="127.0.0.1")
    await collector.start_server()
    try:
        text, credentials = _edge_config(
            tmp_path, server.port or 0, endpoint(collector.port or 0), 1.0
        )
        async with running_gateway(tmp_path, text) as gw:
            port = port_of(gw)
            # the pre-flight check: 200 with the token, 401 without it
            check = answers_with((credentials.header,))
            await asyncio.to_thread(check, "gateway+edge", f"http://127.0.0.1:{port}/")
            foreign = mint().token  # signed by another key
            answer = await exchange(
                port,
                f"GET / HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer {foreign}\r\n\r\n".encode(),
            )
            assert answer.status == 401
            tracer = gw.snapshot.tracer
            assert tracer is not None
            assert await asyncio.to_thread(tracer.flush)
        counted = await asyncio.to_thread(counts, collector.port or 0)
        assert counted["rejected"] == 0
        spans = counted["spans"]
        assert isinstance(spans, dict)
        # 200: SERVER + CLIENT; each 401: SERVER only
        assert spans == {"gateway+edge": 4}
    finally:
        await collector.close()


def test_a_load_generator_past_its_time_is_killed_with_the_rest_of_its_round() -> None:
    """`collect`: one run that hangs makes the round fail, and no run of it is left behind."""
    quick = subprocess.Popen(["echo", "done"], stdout=subprocess.PIPE, text=True)
    hung = [subprocess.Popen(["sleep", "60"], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    with pytest.raises(subprocess.TimeoutExpired):
        collect([quick, *hung], 0.5)
    assert [run.returncode for run in hung] == [-9, -9]
    assert quick.returncode == 0
    assert collect([subprocess.Popen(["echo", "ok"], stdout=subprocess.PIPE, text=True)], 5) == [
        "ok\n"
    ]
