"""The proxies compared, each started the same way: listen on one port, forward to the upstream.

Each peer writes its own config into a scratch directory and returns the command to run; the
runner pins it to the proxy core and measures the process it names.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]


@dataclass(frozen=True)
class Peer:
    name: str
    #: the executable that must be installed, or None when it is always available
    needs: str | None
    build: Callable[[Path, int, int, int], Launch]

    def available(self) -> bool:
        if self.needs == "BENCH_BASELINE":
            return bool(os.environ.get("BENCH_BASELINE"))
        return self.needs is None or shutil.which(self.needs) is not None


#: the full-pipeline scenario's stages: none of them refuses anything at this load
PIPELINE = """\
    pipeline:
      - rate_limit: {rate: 1000000, burst: 1000000, key: client_ip}
      - circuit_breaker: {failure_ratio: 0.5, min_requests: 20, window: 10s}
      - retry: {attempts: 2, per_try_timeout: 5s}
      - headers: {request: {set: {X-Env: bench}}, response: {set: {X-Frame-Options: DENY}}}
"""


def gateway_config(port: int, upstream: int, routes: int, pipeline: bool = False) -> str:
    lines = [
        f'listeners: [{{name: http, bind: "127.0.0.1:{port}"}}]',
        'admin: {bind: "127.0.0.1:0"}',
        "access_log: {sample_ratio: 0.01}",
        "shutdown: {drain_delay: 0s, timeout: 2s}",
        "limits: {max_body_bytes: 200MiB, max_connections: 20000}",
        "upstreams:",
        f'  app: {{endpoints: [{{url: "http://127.0.0.1:{upstream}"}}]}}',
        "routes:",
    ]
    # every other route is a decoy on its own prefix; the measured path hits the last one
    for i in range(routes - 1):
        lines.append(f"  - {{name: r{i}, match: {{path_prefix: /decoy{i}}}, upstream: app}}")
    lines.append("  - name: app\n    match: {path_prefix: /}\n    upstream: app")
    return "\n".join(lines) + "\n" + (PIPELINE if pipeline else "")


def _gateway(scratch: Path, port: int, upstream: int, routes: int) -> Launch:
    config = scratch / "gateway.yaml"
    config.write_text(gateway_config(port, upstream, routes))
    return Launch([sys.executable, "-m", "gateway", "run", "-c", str(config)], {})


def _baseline_python() -> str:
    return str(Path(os.environ["BENCH_BASELINE"]) / ".venv" / "bin" / "python")


def _gateway_baseline(scratch: Path, port: int, upstream: int, routes: int) -> Launch:
    """The gateway of another checkout (`BENCH_BASELINE=DIR`, set up with `make setup`), the
    same config: a change measured against the code before it, in one interleaved run."""
    config = scratch / "gateway.yaml"
    config.write_text(gateway_config(port, upstream, routes))
    # -P: the baseline's own package, not the one in the current directory
    return Launch([_baseline_python(), "-P", "-m", "gateway", "run", "-c", str(config)], {})


def _gateway_baseline_pipeline(scratch: Path, port: int, upstream: int, routes: int) -> Launch:
    """The baseline checkout on the full-pipeline route."""
    config = scratch / "gateway.yaml"
    config.write_text(gateway_config(port, upstream, routes, pipeline=True))
    return Launch([_baseline_python(), "-P", "-m", "gateway", "run", "-c", str(config)], {})


def _gateway_pipeline(scratch: Path, port: int, upstream: int, routes: int) -> Launch:
    config = scratch / "gateway.yaml"
    config.write_text(gateway_config(port, upstream, routes, pipeline=True))
    return Launch([sys.executable, "-m", "gateway", "run", "-c", str(config)], {})


def _nginx(scratch: Path, port: int, upstream: int, routes: int) -> Launch:
    config = scratch / "nginx.conf"
    config.write_text(
        textwrap.dedent(
            f"""
            worker_processes 1;
            master_process off;
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
                listen 127.0.0.1:{port};
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


def _haproxy(scratch: Path, port: int, upstream: int, routes: int) -> Launch:
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
              bind 127.0.0.1:{port}
              default_backend be
            backend be
              server app 127.0.0.1:{upstream}
            """
        )
    )
    return Launch(["haproxy", "-db", "-f", str(config)], {})


def _caddy(scratch: Path, port: int, upstream: int, routes: int) -> Launch:
    config = scratch / "Caddyfile"
    config.write_text(
        textwrap.dedent(
            f"""
            {{
              admin off
              auto_https off
            }}
            http://127.0.0.1:{port} {{
              reverse_proxy 127.0.0.1:{upstream}
            }}
            """
        )
    )
    return Launch(
        ["caddy", "run", "--config", str(config), "--adapter", "caddyfile"],
        {"GOMAXPROCS": "1", "XDG_DATA_HOME": str(scratch), "XDG_CONFIG_HOME": str(scratch)},
    )


def _aiohttp(scratch: Path, port: int, upstream: int, routes: int) -> Launch:
    return Launch(
        [sys.executable, "-m", "bench.aiohttp_proxy", str(port), f"http://127.0.0.1:{upstream}"],
        {},
    )


PEERS: dict[str, Peer] = {
    "gateway": Peer("gateway", None, _gateway),
    "gateway+pipeline": Peer("gateway+pipeline", None, _gateway_pipeline),
    "gateway@baseline": Peer("gateway@baseline", "BENCH_BASELINE", _gateway_baseline),
    "gateway@baseline+pipeline": Peer(
        "gateway@baseline+pipeline", "BENCH_BASELINE", _gateway_baseline_pipeline
    ),
    "nginx": Peer("nginx", "nginx", _nginx),
    "haproxy": Peer("haproxy", "haproxy", _haproxy),
    "caddy": Peer("caddy", "caddy", _caddy),
    "aiohttp": Peer("aiohttp", None, _aiohttp),
}
