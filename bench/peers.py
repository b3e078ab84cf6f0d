"""The proxies compared, each started the same way: listen on one port, forward to the upstream.

Each peer writes its own config into a scratch directory and returns the command to run; the
runner pins it to the proxy core and measures the process it names.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.tokens import JWT_STAGE


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]


@dataclass(frozen=True)
class Context:
    """What a scenario hands its peers besides ports; empty for most scenarios."""

    #: the JWKS document an authenticating peer's jwt stage reads (written to its scratch dir)
    jwks: bytes = b""
    #: the OTLP/HTTP receiver a traced peer exports to (bench/otlp_sink.py)
    otlp_endpoint: str = ""
    #: the Redis a peer limiting through a redis store uses (redis://127.0.0.1:PORT/0)
    redis_url: str = ""
    #: where a TLS peer finds ca.crt, server.crt/.key (P-256) and the client's certificate
    certs: str = ""


#: (scratch directory, listen port, upstream port, routes, context) -> how to start the peer
Build = Callable[[Path, int, int, int, Context], Launch]


@dataclass(frozen=True)
class Peer:
    name: str
    #: the executable that must be installed, or None when it is always available
    needs: str | None
    build: Build
    #: it exports spans, with its name as their `service.name`
    traced: bool = False
    #: its route needs the scenario's bearer token (401 without it)
    authenticates: bool = False
    #: it serves HTTPS (TLS 1.3, P-256) with the scenario's certificates
    tls: bool = False
    #: it asks for the client's certificate (and refuses a request without one)
    mtls: bool = False
    #: the cores it runs on (taskset's list); None: the proxy core alone
    cores: str | None = None

    def available(self) -> bool:
        if self.needs == "BENCH_BASELINE":
            return bool(os.environ.get("BENCH_BASELINE"))
        return self.needs is None or shutil.which(self.needs) is not None


#: the full-pipeline scenario's stages: none of them refuses anything at this load
PIPELINE = """\
      - rate_limit: {rate: 1000000, burst: 1000000, key: client_ip}
      - circuit_breaker: {failure_ratio: 0.5, min_requests: 20, window: 10s}
      - retry: {attempts: 2, per_try_timeout: 5s}
      - headers: {request: {set: {X-Env: bench}}, response: {set: {X-Frame-Options: DENY}}}
"""


#: the API key the operator scenario's requests carry, and the Origin; the stages it passes
OPERATOR_KEY = "bench-api-key"
OPERATOR_ORIGIN = "https://app.example.com"
#: the operator stages an edge route typically starts with (SPEC §5.8): CORS for a web app, an
#: allow list with a deny hole, an API key — every request passes all three
OPERATOR = f"""\
      - cors: {{allow_origins: ["{OPERATOR_ORIGIN}"], allow_methods: [GET, POST]}}
      - ip_filter: {{allow: [127.0.0.0/8, "::1/128"], deny: [127.0.0.99/32, 10.0.0.0/8]}}
      - api_key: {{keys: {{bench: {hashlib.sha256(OPERATOR_KEY.encode()).hexdigest()}}}}}
"""


#: a peer with two workers runs on both cores of the 2-core machine (SPEC §12)
ALL_CORES = "0,1"

#: a client certificate from the bench's CA is required, and forwarded (RFC 9440)
MTLS_STAGE = "      - mtls: {required: true}\n"


@dataclass(frozen=True)
class Tracing:
    """A `tracing:` section: new traces sampled at `sample_ratio`, spans sent over OTLP/HTTP."""

    sample_ratio: float
    endpoint: str
    service_name: str = "gateway"


def gateway_config(
    port: int,
    upstream: int,
    routes: int,
    pipeline: bool = False,
    *,
    jwt: bool = False,
    tracing: Tracing | None = None,
    limit_store: str | None = None,
    redis_url: str = "",
    operator: bool = False,
    certs: str = "",
    mtls: bool = False,
) -> str:
    """The gateway's YAML: `routes` routes, the last one (prefix /) measured.  `pipeline` puts
    the four stages of PIPELINE on it, `jwt` a jwt stage in front of them (JWT_STAGE: the
    JWKS is `jwks.json` beside the config), and `tracing` turns tracing on.  With `certs` the
    listener is HTTPS (TLS 1.3 only, like the other peers' TLS configs); `mtls` asks clients
    for a certificate from that CA and puts an `mtls` stage first on the route."""
    listener = f'{{name: http, bind: "127.0.0.1:{port}"}}'
    if certs:
        client_ca = f', client_ca: "{certs}/ca.crt"' if mtls else ""
        listener = (
            f'{{name: https, bind: "127.0.0.1:{port}", tls: {{certificates: [{{cert: '
            f'"{certs}/server.crt", key: "{certs}/server.key"}}]{client_ca}, min_version: "1.3"}}}}'
        )
    lines = [
        f"listeners: [{listener}]",
        'admin: {bind: "127.0.0.1:0"}',
        "access_log: {sample_ratio: 0.01}",
        "shutdown: {drain_delay: 0s, timeout: 2s}",
        "limits: {max_body_bytes: 200MiB, max_connections: 20000}",
    ]
    if limit_store not in (None, "memory"):
        lines.append(f'stores: {{{limit_store}: {{url: "{redis_url}", timeout: 250ms}}}}')
    if tracing is not None:
        lines.append(
            f'tracing: {{service_name: "{tracing.service_name}", '
            f"sample_ratio: {tracing.sample_ratio}, exporter: otlp, "
            f'endpoint: "{tracing.endpoint}"}}'
        )
    lines += [
        "upstreams:",
        f'  app: {{endpoints: [{{url: "http://127.0.0.1:{upstream}"}}]}}',
        "routes:",
    ]
    # every other route is a decoy on its own prefix; the measured path hits the last one
    for i in range(routes - 1):
        lines.append(f"  - {{name: r{i}, match: {{path_prefix: /decoy{i}}}, upstream: app}}")
    lines.append("  - name: app\n    match: {path_prefix: /}\n    upstream: app")
    stages = (
        (MTLS_STAGE if mtls else "")
        + (OPERATOR if operator else "")
        + (f"      - {JWT_STAGE}\n" if jwt else "")
        + (PIPELINE if pipeline else "")
    )
    if limit_store is not None:
        # one hot key (the route), never refused at this load: what the store costs a request
        stages += f"      - rate_limit: {{rate: 10000000, key: route, store: {limit_store}}}\n"
    return "\n".join(lines) + "\n" + ("    pipeline:\n" + stages if stages else "")


def _baseline_python() -> str:
    return str(Path(os.environ["BENCH_BASELINE"]) / ".venv" / "bin" / "python")


def _gateway_peer(
    name: str,
    *,
    baseline: bool = False,
    pipeline: bool = False,
    jwt: bool = False,
    trace_ratio: float | None = None,
    limit_store: str | None = None,
    operator: bool = False,
    tls: bool = False,
    mtls: bool = False,
    workers: int = 1,
) -> Peer:
    """A gateway peer: this checkout's, or with `baseline` the one of another checkout
    (`BENCH_BASELINE=DIR`, set up with `make setup`) on the same config, so a change is measured
    against the code before it in one interleaved run."""

    def build(scratch: Path, port: int, upstream: int, routes: int, context: Context) -> Launch:
        tracing = None
        if trace_ratio is not None:
            if not context.otlp_endpoint:
                raise RuntimeError(f"{name} needs the scenario's OTLP receiver")
            tracing = Tracing(trace_ratio, context.otlp_endpoint, service_name=name)
        if limit_store not in (None, "memory") and not context.redis_url:
            raise RuntimeError(f"{name} needs the scenario's Redis")
        if tls and not context.certs:
            raise RuntimeError(f"{name} needs the scenario's certificates")
        if jwt:
            if not context.jwks:
                raise RuntimeError(f"{name} needs the scenario's JWKS")
            (scratch / "jwks.json").write_bytes(context.jwks)
        config = scratch / "gateway.yaml"
        config.write_text(
            gateway_config(
                port,
                upstream,
                routes,
                pipeline,
                jwt=jwt,
                tracing=tracing,
                limit_store=limit_store,
                redis_url=context.redis_url,
                operator=operator,
                certs=context.certs if tls else "",
                mtls=mtls,
            )
        )
        run = ["-m", "gateway", "run", "-c", str(config)]
        if workers > 1:
            run += ["--workers", str(workers)]
        if baseline:
            # -P: the baseline's own package, not the one in the current directory
            return Launch([_baseline_python(), "-P", *run], {})
        return Launch([sys.executable, *run], {})

    needs = "BENCH_BASELINE" if baseline else None
    if limit_store not in (None, "memory"):
        needs = "redis-server"
    return Peer(
        name,
        needs,
        build,
        traced=trace_ratio is not None,
        authenticates=jwt or operator,
        tls=tls,
        mtls=mtls,
        cores=ALL_CORES if workers > 1 else None,
    )


def _nginx_build(tls: bool = False, mtls: bool = False, workers: int = 1) -> Build:
    def build(scratch: Path, port: int, upstream: int, routes: int, context: Context) -> Launch:
        listen = f"listen 127.0.0.1:{port};"
        if tls:
            certs = context.certs
            listen = textwrap.dedent(
                f"""\
                listen 127.0.0.1:{port} ssl;
                    ssl_certificate {certs}/server.crt;
                    ssl_certificate_key {certs}/server.key;
                    ssl_protocols TLSv1.3;
                    ssl_ecdh_curve prime256v1;
                    ssl_session_tickets on;"""
            )
            if mtls:
                listen += textwrap.dedent(
                    f"""
                        ssl_client_certificate {certs}/ca.crt;
                        ssl_verify_client on;"""
                )
        # one worker is nginx without its master process; with more, the master forks them
        processes = (
            "worker_processes 1; master_process off;"
            if workers == 1
            else f"worker_processes {workers};"
        )
        config = scratch / "nginx.conf"
        config.write_text(
            textwrap.dedent(
                f"""
                {processes}
                daemon off;
                pid {scratch}/nginx.pid;
                error_log {scratch}/nginx.err;
                events {{ worker_connections 20000; }}
                http {{
                  access_log off;
                  client_max_body_size 200m;
                  proxy_request_buffering off;
                  proxy_buffering off;
                  upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}
                  server {{
                    {listen}
                    keepalive_requests 1000000;
                    location / {{
                      proxy_pass http://app;
                      proxy_http_version 1.1;
                      proxy_set_header Connection "";
                    }}
                  }}
                }}
                """
            )
        )
        return Launch(["nginx", "-p", str(scratch), "-c", str(config)], {})

    return build


def _haproxy_build(tls: bool = False, mtls: bool = False) -> Build:
    def build(scratch: Path, port: int, upstream: int, routes: int, context: Context) -> Launch:
        bind = f"bind 127.0.0.1:{port}"
        if tls:
            # haproxy reads the certificate and its key from one file
            pem = scratch / "server.pem"
            certs = Path(context.certs)
            pem.write_bytes(
                (certs / "server.crt").read_bytes() + (certs / "server.key").read_bytes()
            )
            bind += f" ssl crt {pem} ssl-min-ver TLSv1.3 curves P-256"
            if mtls:
                bind += f" ca-file {certs}/ca.crt verify required"
        config = scratch / "haproxy.cfg"
        config.write_text(
            textwrap.dedent(
                f"""
                global
                  nbthread 1
                  maxconn 8000
                defaults
                  mode http
                  timeout connect 5s
                  timeout client 60s
                  timeout server 60s
                  http-reuse always
                frontend fe
                  {bind}
                  default_backend be
                backend be
                  server app 127.0.0.1:{upstream}
                """
            )
        )
        return Launch(["haproxy", "-db", "-f", str(config)], {})

    return build


def _caddy_build(tls: bool = False, mtls: bool = False) -> Build:
    def build(scratch: Path, port: int, upstream: int, routes: int, context: Context) -> Launch:
        site = f"http://127.0.0.1:{port}"
        tls_line = ""
        if tls:
            # no host in the address: a site for 127.0.0.1 answers a request without a Host
            # (`openssl s_time -www` sends HTTP/1.0 without one) with an empty 200 of its own
            # instead of proxying it; `bind` keeps it on the loopback all the same
            site = f"https://:{port}"
            certs = context.certs
            # the lines after the first indented as the template's, which dedent strips
            client_auth = (
                "                    client_auth {\n"
                "                      mode require_and_verify\n"
                f"                      trusted_ca_cert_file {certs}/ca.crt\n"
                "                    }\n"
                if mtls
                else ""
            )
            tls_line = (
                "bind 127.0.0.1\n"
                f"                  tls {certs}/server.crt {certs}/server.key {{\n"
                "                    protocols tls1.3\n"
                "                    curves secp256r1\n"
                f"{client_auth}"
                "                  }"
            )
        config = scratch / "Caddyfile"
        config.write_text(
            textwrap.dedent(
                f"""
                {{
                  admin off
                  auto_https off
                }}
                {site} {{
                  {tls_line}
                  reverse_proxy 127.0.0.1:{upstream}
                }}
                """
            )
        )
        return Launch(
            ["caddy", "run", "--config", str(config), "--adapter", "caddyfile"],
            {"GOMAXPROCS": "1", "XDG_DATA_HOME": str(scratch), "XDG_CONFIG_HOME": str(scratch)},
        )

    return build


def _aiohttp(scratch: Path, port: int, upstream: int, routes: int, context: Context) -> Launch:
    return Launch(
        [sys.executable, "-m", "bench.aiohttp_proxy", str(port), f"http://127.0.0.1:{upstream}"],
        {},
    )


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        _gateway_peer("gateway"),
        _gateway_peer("gateway+pipeline", pipeline=True),
        _gateway_peer("gateway@baseline", baseline=True),
        _gateway_peer("gateway@baseline+pipeline", baseline=True, pipeline=True),
        # the edge: a bearer token checked, four stages, 1 % of requests traced to a receiver
        _gateway_peer("gateway+edge", pipeline=True, jwt=True, trace_ratio=0.01),
        # the bare route traced at 1 %, and traced at 0 % (propagation only, nothing sampled)
        _gateway_peer("gateway+traced", trace_ratio=0.01),
        _gateway_peer("gateway+unsampled", trace_ratio=0.0),
        # the baseline checkout traced at 1 %, to measure a change to tracing against its code
        _gateway_peer("gateway@baseline+traced", baseline=True, trace_ratio=0.01),
        # one hot rate-limited key, in this worker's memory and shared through Redis (leases)
        _gateway_peer("gateway+limit", limit_store="memory"),
        _gateway_peer("gateway+redis-limit", limit_store="shared"),
        # cors, ip_filter and api_key in front of the bare route
        _gateway_peer("gateway+operator", operator=True),
        # the baseline checkout with the same stages, to measure a change to them against its code
        _gateway_peer("gateway@baseline+operator", baseline=True, operator=True),
        Peer("nginx", "nginx", _nginx_build()),
        Peer("haproxy", "haproxy", _haproxy_build()),
        Peer("caddy", "caddy", _caddy_build()),
        # two worker processes on both cores, sharing them with the upstream and wrk
        _gateway_peer("gateway+workers2", workers=2),
        Peer("nginx+workers2", "nginx", _nginx_build(workers=2), cores=ALL_CORES),
        # HTTPS: TLS 1.3, P-256, the scenario's certificates (`tls`, `handshakes`)
        _gateway_peer("gateway+tls", tls=True),
        # the baseline checkout over HTTPS, to measure a change to the TLS path against its code
        _gateway_peer("gateway@baseline+tls", baseline=True, tls=True),
        Peer("nginx+tls", "nginx", _nginx_build(tls=True), tls=True),
        Peer("haproxy+tls", "haproxy", _haproxy_build(tls=True), tls=True),
        Peer("caddy+tls", "caddy", _caddy_build(tls=True), tls=True),
        # the edge over TLS: a client certificate required, then the edge peer's pipeline
        _gateway_peer(
            "gateway+edge-tls", pipeline=True, jwt=True, trace_ratio=0.01, tls=True, mtls=True
        ),
        Peer("nginx+mtls", "nginx", _nginx_build(tls=True, mtls=True), tls=True, mtls=True),
        # the same, asking for a client certificate from the bench's CA (`handshakes`)
        _gateway_peer("gateway+mtls", tls=True, mtls=True),
        _gateway_peer("gateway@baseline+mtls", baseline=True, tls=True, mtls=True),
        Peer("haproxy+mtls", "haproxy", _haproxy_build(tls=True, mtls=True), tls=True, mtls=True),
        Peer("caddy+mtls", "caddy", _caddy_build(tls=True, mtls=True), tls=True, mtls=True),
        Peer("aiohttp", None, _aiohttp),
    )
}
