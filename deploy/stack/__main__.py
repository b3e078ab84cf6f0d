"""`make stack`: the local stack in the foreground until Ctrl-C (SIGINT) or SIGTERM.

python -m deploy.stack [--dir DIR] [--free-ports] [--scrape-interval 5s]
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from deploy.stack.launcher import REPO, Ports, Stack, StackError


class _Interrupted(Exception):
    pass


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def summary(stack: Stack) -> str:
    ports = stack.ports
    g1, g2 = ports.gateways
    lines = [
        "The stack is up (config/compose.yaml, everything on 127.0.0.1):",
        "",
        f"  gateway-1   http://127.0.0.1:{g1.http}  https://127.0.0.1:{g1.https}"
        f"  status :{g1.status}  admin :{g1.admin}",
        f"  gateway-2   http://127.0.0.1:{g2.http}  https://127.0.0.1:{g2.https}"
        f"  status :{g2.status}  admin :{g2.admin}",
        f"  prometheus  {stack.prometheus_url}  (targets: /targets, alerts: /alerts)",
        f"  redis       127.0.0.1:{ports.redis}",
        f"  upstreams   users {stack.upstream_url('users')}, orders {stack.upstream_url('orders')}"
        "  (GET /_demo/counts on each)",
        f"  traces      OTLP/HTTP on :{ports.otlp}, written to {stack.spans_file}",
        f"  logs        {stack.directory}/<name>.log",
        "",
        "  a shared limit: for i in $(seq 12); do curl -s -o /dev/null -w '%{http_code} ' "
        f"127.0.0.1:$(( i % 2 ? {g1.http} : {g2.http} ))/users; done",
        f"  a replay:       curl -si -X POST -H 'Idempotency-Key: demo-1' {stack.gateway_url(0)}"
        f"/orders; curl -si -X POST -H 'Idempotency-Key: demo-1' {stack.gateway_url(1)}/orders",
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.stack", description=__doc__)
    parser.add_argument(
        "--dir", type=Path, default=REPO / "build" / "stack", help="logs, spans and data"
    )
    parser.add_argument(
        "--free-ports", action="store_true", help="any free ports instead of the fixed ones"
    )
    parser.add_argument(
        "--scrape-interval", help="Prometheus's interval (default: config/prometheus.yml's)"
    )
    args = parser.parse_args(argv)
    stack = Stack(
        args.dir.resolve(),
        Ports.free() if args.free_ports else Ports.fixed(),
        scrape_interval=args.scrape_interval,
    )
    # a signal during start() interrupts it too: start() stops what it began, then re-raises
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        print(f"starting the stack in {stack.directory} …", flush=True)
        stack.start()
        print(summary(stack), flush=True)
        exited = stack.wait_for_exit()
        print(f"{exited} exited on its own: stopping the stack", file=sys.stderr)
        return 1
    except _Interrupted as interrupt:
        print(f"{interrupt}: stopping the stack …", flush=True)
        return 0
    except StackError as error:
        print(f"the stack could not start: {error}", file=sys.stderr)
        return 1
    finally:
        # stopping is bounded (SIGKILL after the drain's time): another Ctrl-C must not
        # interrupt it halfway and leave processes behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        print("stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
