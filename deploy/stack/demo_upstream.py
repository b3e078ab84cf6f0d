"""A demo upstream for the stack: it answers every request with its name and how many requests
it has executed, so a person with curl (or a test) sees what reached it and what was replayed.

Run: python demo_upstream.py --name users --port 9001 [--host 127.0.0.1]

The standard library only: docker-compose.yml mounts this one file into a stock python image,
and `make stack` runs it with the project's interpreter.

- any method on any path: 200, JSON `{"upstream", "execution", "method", "path",
  "idempotency_key"}`, `execution` being this request's number (1, 2, …) and `X-Upstream` the
  name. A replayed answer keeps the number of the request that really ran.
- `GET /healthz`: 200 `ok` (the container healthcheck and the launcher; not counted).
- `GET /_demo/counts`: `{"upstream", "executions", "by_idempotency_key": {key: n}}` (not counted).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType


class Counts:
    """What this upstream executed; one lock, since the server answers on a thread per client."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.executions = 0
        self.by_key: Counter[str] = Counter()

    def count(self, key: str | None) -> int:
        with self.lock:
            self.executions += 1
            if key is not None:
                self.by_key[key] += 1
            return self.executions

    def snapshot(self) -> dict[str, object]:
        with self.lock:
            return {"executions": self.executions, "by_idempotency_key": dict(self.by_key)}


def handler(name: str, counts: Counts) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # keep-alive: the gateway pools its connections to upstreams
        protocol_version = "HTTP/1.1"
        server_version = "demo-upstream"

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Upstream", name)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, value: object) -> None:
            self._answer(200, json.dumps(value).encode() + b"\n", "application/json")

        def _drop_body(self) -> None:
            """Read the request body and drop it, so the kept-alive connection stays usable."""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        # trailers, if any, end with an empty line
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return
                    self.rfile.read(size + 2)  # the chunk and its CRLF
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)

        def _execute(self) -> None:
            self._drop_body()
            if self.command == "GET" and self.path == "/healthz":
                self._answer(200, b"ok\n", "text/plain")
                return
            if self.command == "GET" and self.path == "/_demo/counts":
                self._json({"upstream": name, **counts.snapshot()})
                return
            key = self.headers.get("Idempotency-Key")
            self._json(
                {
                    "upstream": name,
                    "execution": counts.count(key),
                    "method": self.command,
                    "path": self.path,
                    "idempotency_key": key,
                }
            )

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _execute

        def log_message(self, format: str, *args: object) -> None:
            pass  # the gateway's access log already has every request

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), handler(args.name, Counts()))
    server.daemon_threads = True

    def stop(signum: int, frame: FrameType | None) -> None:
        # as PID 1 in a container a signal without a handler is ignored: exit on SIGTERM
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"{args.name} listening on {args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])
