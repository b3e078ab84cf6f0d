"""`python -m bench [--scenario NAME]...`: run, print a markdown table, write JSON."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from bench.headers import nginx_add_headers
from bench.runner import LOAD_CORE, Result, free_port, running, wait_http, wrk_round
from bench.scenarios import SCENARIOS, Settings

REPO = Path(__file__).resolve().parents[1]


def _version(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def machine() -> dict[str, object]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release()}


def tools() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "wrk": _version(["wrk", "--version"]),
        "nginx": _version(["nginx", "-v"]),
        "haproxy": _version(["haproxy", "-v"]),
        "caddy": _version(["caddy", "version"]),
    }


def commit() -> str:
    out = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "unknown"


def _upstream_argv(port: int, scratch: Path) -> tuple[list[str], str]:
    """nginx returning a fixed body when installed, else our own raw-protocol upstream."""
    if shutil.which("nginx"):
        conf = scratch / "upstream.conf"
        conf.write_text(
            textwrap.dedent(
                f"""
                worker_processes 1;
                master_process off;
                daemon off;
                pid {scratch}/upstream.pid;
                error_log {scratch}/upstream.err;
                events {{ worker_connections 20000; }}
                http {{
                  access_log off;
                  server {{
                    listen 127.0.0.1:{port};
                    keepalive_requests 1000000;
                    client_max_body_size 200m;
                    location / {{ return 200 "hello world\\n"; }}
                    location /big {{ alias {scratch}/big.bin; }}
                    location /headers {{ {nginx_add_headers()} return 200 "hello world\\n"; }}
                  }}
                }}
                """
            )
        )
        with (scratch / "big.bin").open("wb") as big:
            big.truncate(100 * 1024 * 1024)  # the streaming scenario's download
        return ["nginx", "-p", str(scratch), "-c", str(conf)], "nginx (fixed body)"
    return [sys.executable, "-m", "bench.upstream", str(port)], "bench.upstream (built in)"


def _figure(value: float) -> str:
    """A count without decimals, a ratio with two."""
    return f"{value:,.0f}" if value == int(value) and abs(value) >= 10 else f"{value:.2f}"


def table(results: list[Result], baseline: dict[str, Result]) -> str:
    head = (
        "| scenario | proxy | req/s | x nginx | p50 ms | p99 ms | CPU us/req | peak RSS MiB "
        "| errors or figures |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    # a scenario that works out each row's ratio to nginx itself (`x_nginx`: handshakes, whose
    # rows compare to nginx's row of the same mode) shows that one in the column
    own_ratios = {r.scenario for r in results if "x_nginx" in r.figures}
    for r in results:
        s = r.summary()
        if not r.rounds:
            extra = ", ".join(f"{k} {v:g}" for k, v in r.figures.items()) or s["note"]
            rows.append(
                f"| {r.scenario} | {r.peer} | - | - | - | - | - | {s['peak_rss_mib']} | {extra} |"
            )
            continue
        nginx = baseline.get(r.scenario)
        if r.scenario in own_ratios:
            ratio = f"{r.figures['x_nginx']:.2f}" if "x_nginx" in r.figures else "-"
        else:
            ratio = (
                f"{r.median('rps') / nginx.median('rps'):.2f}" if nginx and nginx.rounds else "-"
            )
        figures = "".join(f"; {k} {_figure(v)}" for k, v in r.figures.items() if k != "x_nginx")
        # s_time measures no latencies (the handshakes scenario's rounds have none)
        p50, p99 = (s["p50_ms"], s["p99_ms"]) if s["p50_ms"] or s["p99_ms"] else ("-", "-")
        rows.append(
            f"| {r.scenario} | {r.peer} | {s['rps']:,.0f} | {ratio} | {p50} | "
            f"{p99} | {s['cpu_us_per_request']} | {s['peak_rss_mib']} | "
            f"{s['errors']}{figures} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--peer", action="append", help="only these proxies")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (make bench-deps)", file=sys.stderr)
        return 2
    names = args.scenario or list(SCENARIOS)
    upstream_port = free_port()
    settings = Settings(
        rounds=args.rounds,
        seconds=args.seconds,
        connections=args.connections,
        upstream_port=upstream_port,
    )
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-upstream-") as scratch:
        upstream_argv, upstream_kind = _upstream_argv(upstream_port, Path(scratch))
        with running(upstream_argv, LOAD_CORE) as upstream:
            wait_http(upstream_port)
            ceiling = Result(peer="upstream (direct)", scenario="ceiling")
            for _ in range(settings.rounds):
                ceiling.rounds.append(
                    wrk_round(
                        upstream.pid,
                        f"http://127.0.0.1:{upstream_port}/",
                        settings.connections,
                        settings.seconds,
                    )
                )
            results.append(ceiling)
            for name in names:
                scenario = SCENARIOS[name]
                peers = [p for p in scenario.peers if not args.peer or p in args.peer]
                if peers:
                    results.extend(scenario.run(scenario, peers, settings))
    # each scenario's nginx: plain, or the one configured like the scenario's peers (+tls …)
    baseline: dict[str, Result] = {}
    for r in results:
        if r.peer.partition("+")[0] == "nginx":
            baseline.setdefault(r.scenario, r)
    date, revision = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), commit()
    report = {
        "date": date,
        "commit": revision,
        "machine": machine(),
        "tools": tools(),
        "upstream": upstream_kind,
        "settings": {
            "rounds": settings.rounds,
            "seconds": settings.seconds,
            "connections": settings.connections,
        },
        "results": [r.as_dict() for r in results],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{date.replace(':', '')}-{revision}.json"
    path.write_text(json.dumps(report, indent=2))
    print(table(results, baseline))
    print(f"\nupstream: {upstream_kind}; JSON: {path}")
    return 0
