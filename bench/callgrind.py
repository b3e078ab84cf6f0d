"""Instructions per request on one route, counted by valgrind's callgrind.

Run: python -m bench.callgrind [--route ROUTE] [--tracing RATIO] [--requests N] [--out FILE]
                              [--tls | --mtls] [--handshakes full|resumed] [--cache-sim]

ROUTE: bare, operator, pipeline, edge or large-headers (the scenarios' requests and routes;
edge is the pipeline behind a jwt stage, with a token minted for the run — add `--tracing 0.01`
for the edge scenario's tracing).
RATIO: turns tracing on with that `sample_ratio` (0: traced, nothing sampled), exporting over
OTLP/HTTP to `bench.otlp_sink`; without it the config has no `tracing:` section.
--tls serves the route over HTTPS (TLS 1.3, certificates made for the run), as the `tls`
scenario does; --mtls also presents a client certificate to an `mtls` stage first on the route
(the `edge-tls` scenario is `--route edge --mtls --tracing 0.01`).  With --handshakes, each
request is on a new connection — the handshakes scenario's GET, as `openssl s_time` sends it —
with a full handshake or resuming the previous connection's session, and the figure is per
connection.

The gateway runs under callgrind with instrumentation off; 10 keep-alive connections are opened
and warmed up (500 requests), then it is switched on for N requests on the same connections
(`bench.upstream` answering) — no accept or TLS handshake is counted — then off again, and the
gateway is stopped.  Prints user-space instructions per request (every thread of
the gateway counted) and the functions with the most exclusive instructions — with
`--cache-sim`, also the cache misses per request of callgrind's model of this machine's caches
(slower still) — and the callgrind file is kept for `callgrind_annotate`.  Loopback only,
bounded: a few minutes at N = 3,000, as valgrind runs the gateway ~50 times slower.
Instruction counts are what to compare between two commits: unlike req/s on a shared VM they
move by well under 1 % from run to run.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import otlp_sink
from bench.headers import REQUEST_HEADERS
from bench.peers import OPERATOR_KEY, OPERATOR_ORIGIN, Tracing, gateway_config
from bench.scenarios import s_time_client, s_time_exchange
from bench.tokens import mint
from gateway.dev_certificates import init_dev_certificates

CONNECTIONS = 10
WARM_UP = 500
HANDSHAKE_WARM_UP = 20
STARTUP_DEADLINE = 120.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_for_port(port: int, deadline: float) -> None:
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port}") from None
            time.sleep(0.1)


def _request(route: str, authorization: str = "") -> bytes:
    """The request sent on `route`; `authorization` is the edge route's bearer-token header."""
    headers = ["Host: bench"]
    path = "/"
    if route == "edge":
        headers.append(authorization)
    elif route == "operator":
        headers += [f"X-API-Key: {OPERATOR_KEY}", f"Origin: {OPERATOR_ORIGIN}"]
    elif route == "large-headers":
        # the large-headers scenario's 40 request headers; /headers answers with 20
        headers += REQUEST_HEADERS
        path = "/headers"
    lines = "".join(f"{h}\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\n{lines}\r\n".encode()


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, count: int
) -> None:
    for _ in range(count):
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected answer: {head[:80]!r}")
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if match is None:
            raise RuntimeError("an answer without Content-Length")
        await reader.readexactly(int(match.group(1)))


async def _load(
    port: int, request: bytes, total: int, pid: int, tls: ssl.SSLContext | None = None
) -> None:
    """`WARM_UP` requests, then `total` counted ones (callgrind's instrumentation switched on
    for them in gateway process `pid`), on the same `CONNECTIONS` keep-alive connections: no
    connection's accept or TLS handshake is counted as a request's."""
    connections = [
        await asyncio.open_connection("127.0.0.1", port, ssl=tls) for _ in range(CONNECTIONS)
    ]
    try:
        each = max(1, WARM_UP // CONNECTIONS)
        await asyncio.gather(*(_exchange(r, w, request, each) for r, w in connections))
        _instrumentation(pid, "on")
        each = max(1, total // CONNECTIONS)
        await asyncio.gather(*(_exchange(r, w, request, each) for r, w in connections))
        _instrumentation(pid, "off")
    finally:
        for _, writer in connections:
            writer.close()


def _handshakes(port: int, count: int, pid: int, certs: Path, mtls: bool, resumed: bool) -> int:
    """`count` new TLS connections counted (after a warm-up of `HANDSHAKE_WARM_UP`), each doing
    the handshakes scenario's one small GET (`s_time_exchange`): full handshakes, or each
    offering the previous connection's session (`resumed`).  How many did resume."""
    context = s_time_client(certs, mtls)
    session = None
    for _ in range(HANDSHAKE_WARM_UP):
        _, session, _ = s_time_exchange(port, context, session if resumed else None)
    _instrumentation(pid, "on")
    reused = 0
    for _ in range(count):
        _, session, was_resumed = s_time_exchange(port, context, session if resumed else None)
        reused += was_resumed
    _instrumentation(pid, "off")
    return reused


def _instrumentation(pid: int, state: str) -> None:
    # run while the connections are idle: blocking the load's loop meanwhile is harmless
    subprocess.run(["callgrind_control", "-i", state, str(pid)], check=True)


def _totals(out: Path) -> dict[str, int]:
    """Each event's count on the file's `totals:` line (its `summary:` counts from the start,
    which was off), by the names of its `events:` line (Ir; with --cache-sim the misses too)."""
    lines = out.read_text().splitlines()
    events = next((line.split()[1:] for line in lines if line.startswith("events:")), ["Ir"])
    for line in reversed(lines):
        if line.startswith("totals:"):
            return dict(zip(events, (int(n) for n in line.split()[1:]), strict=False))
    raise RuntimeError(f"no totals in {out}")


def _total_instructions(out: Path) -> int:
    return _totals(out)["Ir"]


#: callgrind's cache-simulation events, as the report names them
_MISSES = {
    "I1mr": "L1 instruction",
    "D1mr": "L1 data read",
    "D1mw": "L1 data write",
    "ILmr": "last-level instruction",
    "DLmr": "last-level data read",
    "DLmw": "last-level data write",
}


def _cache_lines(out: Path) -> list[str]:
    """How the caches were simulated (the file's `desc:` lines naming a cache), if they were."""
    return [
        line[len("desc: ") :]
        for line in out.read_text().splitlines()[:20]
        if line.startswith("desc:") and "cache:" in line
    ]


def _config(
    route: str,
    port: int,
    upstream: int,
    tracing: Tracing | None = None,
    certs: str = "",
    mtls: bool = False,
) -> str:
    return gateway_config(
        port,
        upstream,
        1,
        pipeline=route in ("pipeline", "edge"),
        jwt=route == "edge",
        operator=route == "operator",
        tracing=tracing,
        certs=certs,
        mtls=mtls,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--route",
        choices=("bare", "operator", "pipeline", "edge", "large-headers"),
        default="bare",
    )
    parser.add_argument("--tracing", type=float, default=None, metavar="RATIO")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve the route over HTTPS (TLS 1.3, P-256; certificates made for the run)",
    )
    parser.add_argument(
        "--mtls",
        action="store_true",
        help="HTTPS with a client certificate, and an mtls stage first on the route",
    )
    parser.add_argument(
        "--handshakes",
        choices=("full", "resumed"),
        default=None,
        help="with --tls or --mtls: a new connection for each request (the handshakes "
        "scenario's GET), full handshakes or resuming the previous connection's session; "
        "instructions per connection",
    )
    parser.add_argument(
        "--cache-sim",
        action="store_true",
        help="also simulate the caches (callgrind --cache-sim=yes) and print misses per request",
    )
    args = parser.parse_args(argv)
    if args.handshakes and not (args.tls or args.mtls):
        parser.error("--handshakes needs --tls or --mtls")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is missing: make bench-deps installs it", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="bench-callgrind-"))
    out = args.out or scratch / "callgrind.out"
    upstream_port, port, sink_port = _free_port(), _free_port(), _free_port()
    tracing = None
    helpers = [subprocess.Popen([sys.executable, "-m", "bench.upstream", str(upstream_port)])]
    if args.tracing is not None:
        tracing = Tracing(args.tracing, otlp_sink.endpoint(sink_port))
        helpers.append(subprocess.Popen([sys.executable, "-m", "bench.otlp_sink", str(sink_port)]))
    authorization = ""
    if args.route == "edge":
        credentials = mint()
        (scratch / "jwks.json").write_bytes(credentials.jwks)  # the jwt stage's jwks_file
        authorization = credentials.header
    tls = None
    certs = ""
    if args.tls or args.mtls:
        init_dev_certificates(scratch / "certs", ["localhost", "127.0.0.1"])
        certs = str(scratch / "certs")
        tls = s_time_client(scratch / "certs", args.mtls)  # TLS 1.3: the listener allows no less
    reused = 0
    config = scratch / "gateway.yaml"
    config.write_text(_config(args.route, port, upstream_port, tracing, certs, args.mtls))
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        *(["--cache-sim=yes"] if args.cache_sim else []),
        f"--callgrind-out-file={out}",
        sys.executable,
        "-m",
        "gateway",
        "run",
        "-c",
        str(config),
    ]
    gateway = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE
        _wait_for_port(upstream_port, deadline)
        if tracing is not None:
            _wait_for_port(sink_port, deadline)
        _wait_for_port(port, deadline)
        if args.handshakes:
            reused = _handshakes(
                port,
                args.requests,
                gateway.pid,
                scratch / "certs",
                args.mtls,
                args.handshakes == "resumed",
            )
        else:
            request = _request(args.route, authorization)
            asyncio.run(_load(port, request, args.requests, gateway.pid, tls))
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(timeout=120)
        except subprocess.TimeoutExpired:
            gateway.kill()
        for helper in helpers:
            helper.terminate()
            helper.wait(timeout=10)
    measured = args.requests if args.handshakes else (args.requests // CONNECTIONS) * CONNECTIONS
    totals = _totals(out)
    per_request = totals["Ir"] / measured / 1000
    traced = "" if args.tracing is None else f", tracing at {args.tracing:g}"
    over = " over mTLS" if args.mtls else " over TLS" if args.tls else ""
    if args.handshakes:
        print(
            f"{args.route}{over}, {args.handshakes} handshakes{traced}: {per_request:.1f}k"
            f" instructions per connection ({measured} connections, {reused} resumed)"
        )
    else:
        print(f"{args.route}{over}{traced}: {per_request:.1f}k instructions per request", end="")
        print(f" ({measured} requests)")
    if args.cache_sim:
        misses = ", ".join(
            f"{name} {totals[event] / measured:.0f}"
            for event, name in _MISSES.items()
            if event in totals
        )
        print(f"cache misses per request: {misses}")
        print("simulated: " + "; ".join(_cache_lines(out)))
    annotate = subprocess.run(
        ["callgrind_annotate", "--threshold=100", str(out)], capture_output=True, text=True
    )
    lines = [line for line in annotate.stdout.splitlines() if re.match(r"^\s*[\d,]+ \(", line)]
    for line in lines[1 : args.top + 1]:
        count_text, _, rest = line.strip().partition(" ")
        count = int(count_text.replace(",", ""))
        # "(12.3%)  file:function [object]": the function and the object's file name
        where, _, obj = rest.split(")", 1)[-1].strip().partition(" [")
        function = where.rsplit(":", 1)[-1]
        print(f"{count / measured:10.0f}  {function}  ({Path(obj.rstrip(']')).name})")
    print(f"callgrind file: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
