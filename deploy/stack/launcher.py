"""docker-compose.yml's topology from local processes, all on 127.0.0.1.

Two `gateway run --workers 2` replicas on config/compose.yaml (the compose file's own config,
with its addresses pointed at the processes below through the environment variables it reads),
Debian's `redis-server` as the shared store, two demo upstreams (demo_upstream.py), an OTLP/HTTP
receiver writing spans as JSON lines (otlp_receiver.py) in place of Jaeger, and Debian's
`prometheus` scraping both replicas' status listeners with deploy/prometheus's rules and alerts
loaded (config/prometheus.yml, the compose Prometheus's config, with its targets and rule paths
rewritten to this machine's).

`Stack(directory, ports).start()` starts everything and waits until each part answers;
`stop()` stops everything, whatever state `start()` reached. `make stack` runs it in the
foreground (deploy/stack/__main__.py) on the fixed ports of `Ports.fixed()`; tests use
`Ports.free()`.

No process is left behind: each child runs in a session of its own (Ctrl-C in a terminal
reaches only the launcher, which stops the children in order), with the parent-death signal
set to SIGTERM through `setpriv --pdeathsig`, so the children are told to stop even when the
launcher is killed without a chance to clean up (a test run stopped by its timeout). That signal
follows the *thread* that started the child: call `start()` from a thread that outlives the
stack (the main thread, as pytest and `make stack` do).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_CONFIG = REPO / "config" / "compose.yaml"
#: the compose Prometheus's config; its rule_files name files of deploy/prometheus/
PROMETHEUS_CONFIG = REPO / "config" / "prometheus.yml"
RULES = REPO / "deploy" / "prometheus"
CERTS = REPO / "certs"
DEMO_UPSTREAM = Path(__file__).resolve().parent / "demo_upstream.py"

#: how long each part may take to answer after it was started
START_TIMEOUT = 60.0
#: config/compose.yaml's drain_delay + shutdown timeout (25 s), and some room; then SIGKILL
GATEWAY_STOP_TIMEOUT = 35.0
OTHER_STOP_TIMEOUT = 10.0


class StackError(RuntimeError):
    """The stack could not start: what failed, with the end of its log."""


@dataclass(frozen=True)
class GatewayPorts:
    http: int
    https: int
    admin: int
    status: int


@dataclass(frozen=True)
class Ports:
    gateways: tuple[GatewayPorts, GatewayPorts]
    redis: int
    users: int
    orders: int
    otlp: int
    prometheus: int

    @classmethod
    def fixed(cls) -> Ports:
        """`make stack`'s ports, documented in the README: the compose stack's published ones
        where it has them (8080/8081, 8443/8444, 9090, 4318), the usual ones elsewhere."""
        return cls(
            gateways=(GatewayPorts(8080, 8443, 9901, 9902), GatewayPorts(8081, 8444, 9911, 9912)),
            redis=6379,
            users=9001,
            orders=9002,
            otlp=4318,
            prometheus=9090,
        )

    @classmethod
    def free(cls) -> Ports:
        """Ports nothing listens on now, all different (the sockets are held open together
        while they are chosen)."""
        sockets = []
        try:
            for _ in range(13):
                sock = socket.socket()
                sock.bind(("127.0.0.1", 0))
                sockets.append(sock)
            p = [int(s.getsockname()[1]) for s in sockets]
        finally:
            for sock in sockets:
                sock.close()
        return cls(
            gateways=(GatewayPorts(*p[0:4]), GatewayPorts(*p[4:8])),
            redis=p[8],
            users=p[9],
            orders=p[10],
            otlp=p[11],
            prometheus=p[12],
        )

    def named(self) -> dict[str, int]:
        """Every port by what uses it."""
        named = {}
        for index, gateway in enumerate(self.gateways, 1):
            for kind, port in asdict(gateway).items():
                named[f"gateway-{index} {kind}"] = int(port)
        named.update(
            redis=self.redis,
            users=self.users,
            orders=self.orders,
            otlp=self.otlp,
            prometheus=self.prometheus,
        )
        return named


def gateway_env(ports: Ports, index: int) -> dict[str, str]:
    """The variables config/compose.yaml reads, for replica `index` (0 or 1) of the stack."""
    gateway = ports.gateways[index]
    return {
        "GATEWAY_HTTP_BIND": f"127.0.0.1:{gateway.http}",
        "GATEWAY_HTTPS_BIND": f"127.0.0.1:{gateway.https}",
        "GATEWAY_ADMIN_BIND": f"127.0.0.1:{gateway.admin}",
        "GATEWAY_STATUS_BIND": f"127.0.0.1:{gateway.status}",
        "REDIS_ADDRESS": f"127.0.0.1:{ports.redis}",
        # the local redis-server has no password, whatever the caller's environment says
        "REDIS_PASSWORD": "",
        "OTLP_ENDPOINT": f"http://127.0.0.1:{ports.otlp}/v1/traces",
        "USERS_ADDRESS": f"127.0.0.1:{ports.users}",
        "ORDERS_ADDRESS": f"127.0.0.1:{ports.orders}",
    }


def prometheus_config(ports: Ports, scrape_interval: str | None = None) -> dict[str, Any]:
    """config/prometheus.yml with the gateway job's targets on the local status listeners and
    its rule files read from deploy/prometheus/ (the directory compose mounts), so both
    Prometheus servers load the same rules."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["rule_files"] = [str(RULES / Path(path).name) for path in config["rule_files"]]
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "gateway"]
    if len(jobs) != 1:
        raise StackError(f"{PROMETHEUS_CONFIG}: expected one scrape job named gateway")
    jobs[0]["static_configs"] = [
        {"targets": [f"127.0.0.1:{gateway.status}" for gateway in ports.gateways]}
    ]
    if scrape_interval is not None:
        config.setdefault("global", {})["scrape_interval"] = scrape_interval
        config["global"]["evaluation_interval"] = scrape_interval
    return config


class Process:
    """One child: started in a session of its own, its output in `log`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        stop_timeout: float = OTHER_STOP_TIMEOUT,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.env = env
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def start(self) -> None:
        self._log_file = self.log.open("wb")
        try:
            self.proc = subprocess.Popen(
                _with_parent_death_signal(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=self.env,
                # its own session and process group: a terminal's Ctrl-C reaches the launcher
                # only, and the group (a gateway's workers included) can be killed as one
                start_new_session=True,
            )
        except OSError:
            self._log_file.close()
            self._log_file = None
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        """To the process itself, as docker stop does; a gateway forwards it to its workers."""
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signum)

    def wait_stopped(self, timeout: float) -> None:
        """Wait for the process to exit, then make sure nothing of its group is left: SIGKILL
        to the whole group after `timeout`, or at once for what outlived its leader."""
        proc = self.proc
        if proc is None:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"{self.name}: no exit {timeout:.0f}s after SIGTERM, killed", file=sys.stderr)
        if group_members(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _with_parent_death_signal(argv: list[str]) -> list[str]:
    """argv run through util-linux's setpriv, which sets the parent-death signal and then
    execs it (preexec_fn could do the same from Python, but it is unsafe in a process with
    threads, such as pytest's timeout watcher)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return argv
    return [setpriv, "--pdeathsig", "TERM", "--", *argv]


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return int(answer.status) == 200
    except (OSError, urllib.error.HTTPError):
        return False


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _in_use(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class Stack:
    """The local stack: `start()`, then `stop()` (or use it as a context manager)."""

    def __init__(
        self,
        directory: Path,
        ports: Ports | None = None,
        *,
        scrape_interval: str | None = None,
        python: str = sys.executable,
    ) -> None:
        self.directory = directory
        self.ports = ports or Ports.fixed()
        self.scrape_interval = scrape_interval
        self.python = python
        #: the receiver's output: one JSON line per span received
        self.spans_file = directory / "spans.jsonl"
        self.prometheus_file = directory / "prometheus.yml"
        self.state_file = directory / "stack.json"
        #: in the order they were started (stopped in reverse)
        self.processes: list[Process] = []

    # --- addresses -----------------------------------------------------------------------

    def gateway_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.ports.gateways[index].http}"

    def status_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.ports.gateways[index].status}"

    def upstream_url(self, name: str) -> str:
        return f"http://127.0.0.1:{getattr(self.ports, name)}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.prometheus}"

    # --- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start every part and wait until each answers; on any failure (a KeyboardInterrupt
        included) stop what was started and raise."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        self._check_prerequisites()
        # both looked up first: a missing one fails before anything was started
        redis_server, prometheus_server = _require("redis-server"), _require("prometheus")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.spans_file.write_bytes(b"")
        redis_dir = self.directory / "redis"
        redis_dir.mkdir(exist_ok=True)
        data = self.directory / "prometheus-data"
        shutil.rmtree(data, ignore_errors=True)  # a previous run's series would mislead

        # no persistence (a fresh store each run); noeviction as docker-compose.yml sets it: a
        # full Redis refuses new idempotency locks instead of evicting one
        redis_argv = [redis_server, "--bind", "127.0.0.1", "--port", str(self.ports.redis)]
        redis_argv += ["--dir", str(redis_dir), "--save", "", "--appendonly", "no"]
        redis_argv += ["--maxmemory", "256mb", "--maxmemory-policy", "noeviction"]
        redis = self._spawn("redis", redis_argv)
        upstreams = []
        for name in ("users", "orders"):
            port = str(getattr(self.ports, name))
            argv = [self.python, str(DEMO_UPSTREAM), "--name", name, "--port", port]
            upstreams.append(self._spawn(name, [*argv, "--host", "127.0.0.1"]))
        receiver_argv = [self.python, "-m", "deploy.stack.otlp_receiver"]
        receiver_argv += ["--port", str(self.ports.otlp), "--out", str(self.spans_file)]
        receiver = self._spawn("otlp-receiver", receiver_argv)
        self._wait(redis, lambda: _redis_answers(self.ports.redis), timeout)
        for upstream in upstreams:
            self._wait(upstream, partial(_http_ok, self._health_url(upstream)), timeout)
        receiver_health = f"http://127.0.0.1:{self.ports.otlp}/healthz"
        self._wait(receiver, lambda: _http_ok(receiver_health), timeout)

        # both replicas start together: each takes a few seconds to warm
        gateways = []
        for index in range(2):
            env = dict(os.environ, PYTHONUNBUFFERED="1", **gateway_env(self.ports, index))
            argv = [self.python, "-m", "gateway", "run", "-c", str(COMPOSE_CONFIG)]
            gateways.append(
                self._spawn(
                    f"gateway-{index + 1}",
                    [*argv, "--workers", "2"],
                    env=env,
                    stop_timeout=GATEWAY_STOP_TIMEOUT,
                )
            )
        for index, gateway in enumerate(gateways):
            ready = f"{self.status_url(index)}/readyz"
            self._wait(gateway, partial(_http_ok, ready), timeout)

        self.prometheus_file.write_text(
            yaml.safe_dump(prometheus_config(self.ports, self.scrape_interval), sort_keys=False)
        )
        prometheus = self._spawn(
            "prometheus",
            [
                prometheus_server,
                f"--config.file={self.prometheus_file}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{self.ports.prometheus}",
            ],
        )
        self._wait(prometheus, lambda: _http_ok(f"{self.prometheus_url}/-/ready"), timeout)
        self._write_state()

    def stop(self) -> None:
        """Stop everything started, in reverse order: Prometheus, the gateways (SIGTERM, so they
        drain as in a container), then what they use. Safe to call more than once."""
        processes, self.processes = self.processes, []
        by_name = {process.name: process for process in processes}
        gateways = [p for name, p in by_name.items() if name.startswith("gateway-")]
        waves = [
            [p for p in processes if p.name == "prometheus"],
            gateways,
            [p for p in reversed(processes) if p.name != "prometheus" and p not in gateways],
        ]
        for wave in waves:
            for process in wave:
                process.signal(signal.SIGTERM)
            # one deadline per wave: the replicas drain at the same time
            deadline = time.monotonic() + max((p.stop_timeout for p in wave), default=0)
            for process in wave:
                process.wait_stopped(max(0.0, deadline - time.monotonic()))

    def running(self) -> list[str]:
        """The parts that are running now."""
        return [process.name for process in self.processes if process.running()]

    def wait_for_exit(self, poll: float = 0.5) -> str:
        """Block until a part exits on its own; its name (for a supervisor such as make stack)."""
        while True:
            for process in self.processes:
                if not process.running():
                    return process.name
            time.sleep(poll)

    # --- helpers -------------------------------------------------------------------------

    def _check_prerequisites(self) -> None:
        needed = (CERTS / "server.crt", CERTS / "server.key")
        missing = [path.name for path in needed if not path.exists()]
        if missing:
            raise StackError(
                f"config/compose.yaml's HTTPS listener needs {', '.join(missing)} in {CERTS}: "
                "run `make certs` first"
            )
        taken = [f"{name} ({port})" for name, port in self.ports.named().items() if _in_use(port)]
        if taken:
            raise StackError(f"ports in use on 127.0.0.1: {', '.join(taken)}")

    def _spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stop_timeout: float = OTHER_STOP_TIMEOUT,
    ) -> Process:
        process = Process(
            name, argv, self.directory / f"{name}.log", env=env, stop_timeout=stop_timeout
        )
        process.start()
        self.processes.append(process)
        return process

    def _health_url(self, process: Process) -> str:
        return f"{self.upstream_url(process.name)}/healthz"

    def _wait(self, process: Process, answers: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not answers():
            if not process.running():
                raise StackError(
                    f"{process.name} exited ({process.log}):\n{process.tail()}"
                )
            if time.monotonic() > deadline:
                raise StackError(
                    f"{process.name} did not answer within {timeout:.0f}s ({process.log}):\n"
                    f"{process.tail()}"
                )
            time.sleep(0.05)

    def _write_state(self) -> None:
        """stack.json: the ports and every process's pid (its process group's id too), for a
        person looking for a log or a test checking that nothing outlived the stack."""
        state = {
            "ports": self.ports.named(),
            "pids": {process.name: process.pid for process in self.processes},
            "logs": {process.name: str(process.log) for process in self.processes},
            "spans": str(self.spans_file),
        }
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")


def _require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise StackError(f"{program} is not installed: `make test-deps` installs it")
    return path


def read_spans(path: Path) -> list[dict[str, Any]]:
    """The spans the receiver wrote so far (a line still being written is left for later)."""
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line]


def alive(pids: Iterable[int]) -> list[int]:
    """Which of these process groups still have a live member."""
    return [pid for pid in pids if group_members(pid)]
