"""Start things pinned to cores, drive them with wrk (or `openssl s_time` for new TLS
connections), and measure the proxy process.

Layout on a 2-core machine (SPEC §12): the proxy under test on core 0, the upstream and wrk on
core 1 (a peer with two workers gets both cores, shared with them).  CPU time per request comes
from the proxy's own /proc/<pid>/stat counters (its workers' included), so it holds when the
machine is noisy; peak RSS is VmHWM.  Everything binds 127.0.0.1 and every process
started here is stopped before the function that started it returns.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROXY_CORE = "0"
LOAD_CORE = "1"
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Round:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    errors: int


@dataclass
class Result:
    peer: str
    scenario: str
    rounds: list[Round] = field(default_factory=list)
    peak_rss_mib: float = 0.0
    #: requests of the warm-up run before the rounds (not in any figure but spans per request)
    warmup_requests: int = 0
    note: str = ""
    #: scenario-specific figures (RSS growth, MiB/s, ...)
    figures: dict[str, float] = field(default_factory=dict)
    #: rounds run at the same time as the other peers' on the one proxy core (`wrk_together`)
    together: list[Round] = field(default_factory=list)

    def median(self, name: str) -> float:
        return (
            float(statistics.median(getattr(r, name) for r in self.rounds)) if self.rounds else 0.0
        )

    def summary(self) -> dict[str, float | str]:
        return {
            "peer": self.peer,
            "scenario": self.scenario,
            "rps": round(self.median("rps"), 1),
            "p50_ms": round(self.median("p50_ms"), 3),
            "p99_ms": round(self.median("p99_ms"), 3),
            "cpu_us_per_request": round(self.median("cpu_us_per_request"), 2),
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "errors": sum(r.errors for r in self.rounds),
            "note": self.note,
            **{k: round(v, 2) for k, v in self.figures.items()},
        }

    def as_dict(self) -> dict[str, object]:
        return {
            **self.summary(),
            "rounds": [asdict(r) for r in self.rounds],
            "rounds_together": [asdict(r) for r in self.together],
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(core: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", core, *argv] if shutil.which("taskset") else argv


def _answers_http(port: int, tls: ssl.SSLContext | None) -> bool:
    with socket.create_connection(("127.0.0.1", port), 1) as plain:
        s = plain if tls is None else tls.wrap_socket(plain, server_hostname="localhost")
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        return s.recv(16).startswith(b"HTTP/1.")


def client_tls(certs: Path | None = None) -> ssl.SSLContext:
    """A client context trusting the bench's CA (`certs`/ca.crt) and presenting its client
    certificate; without `certs`, one that checks nothing (only waiting for a peer uses it)."""
    if certs is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    context.load_cert_chain(str(certs / "client.crt"), str(certs / "client.key"))
    return context


def wait_http(
    port: int,
    timeout: float = 20.0,
    proc: subprocess.Popen[bytes] | None = None,
    *,
    tls: bool = False,
    certs: Path | None = None,
) -> None:
    """Until a GET / on the port (over TLS with `tls`) gets any HTTP answer; `proc`, when
    given, is the process that should answer: its exit ends the wait at once.  With `certs`
    the client presents the bench's client certificate: a peer requiring one (HAProxy's
    `verify required`) refuses the handshake without it, so it would never seem to answer."""
    deadline = time.monotonic() + timeout
    context = client_tls(certs) if tls else None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if _answers_http(port, context):
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before answering")
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered HTTP on 127.0.0.1:{port} within {timeout}s")


def last_lines(log: Path, count: int = 5) -> str:
    """The end of a process's output, for a failure's note."""
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-count:])


@contextlib.contextmanager
def running(
    argv: list[str], core: str, env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`argv` pinned to `core`, its output (stdout and stderr) in `log` when given."""
    with contextlib.ExitStack() as files:
        output = subprocess.DEVNULL if log is None else files.enter_context(log.open("wb"))
        proc = subprocess.Popen(
            pinned(core, argv),
            env={**os.environ, **(env or {})},
            stdout=output,
            stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _descendants(pid: int) -> list[int]:
    """`pid`'s children, their children and so on (a peer with worker processes)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found.append(int(child))
                found += _descendants(int(child))
    return found


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of `pid` and of its live descendants (a peer's workers)."""
    total = 0
    for one in (pid, *_descendants(pid)):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / _TICK


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measured_pid(proc: subprocess.Popen[bytes]) -> int:
    """The process doing the work: taskset execs in place, so it is the one we started."""
    return proc.pid


_LATENCY = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(output: str) -> tuple[int, float, float, float, int]:
    """(requests, rps, p50 ms, p99 ms, errors) from `wrk --latency` output."""
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    latency = {
        m.group(1): float(m.group(2)) * _UNITS[m.group(3)] for m in _LATENCY.finditer(output)
    }
    errors = 0
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    return requests, rps, latency.get("50", 0.0), latency.get("99", 0.0), errors


def _wrk_argv(url: str, connections: int, seconds: float, headers: Sequence[str]) -> list[str]:
    return pinned(
        LOAD_CORE,
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "--timeout",
            "5s",
            *(arg for header in headers for arg in ("-H", header)),
            url,
        ],
    )


def _round(output: str, cpu_used: float) -> Round:
    requests, rps, p50, p99, errors = parse_wrk(output)
    return Round(
        requests=requests,
        rps=rps,
        p50_ms=p50,
        p99_ms=p99,
        cpu_us_per_request=cpu_used * 1e6 / max(requests, 1),
        errors=errors,
    )


def wrk_round(
    pid: int, url: str, connections: int, seconds: float, headers: Sequence[str] = ()
) -> Round:
    """One wrk run against `url`, each request with the `headers` ("Name: value") added."""
    before = cpu_seconds(pid)
    output = subprocess.run(
        _wrk_argv(url, connections, seconds, headers),
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    return _round(output, cpu_seconds(pid) - before)


def collect(runs: Sequence[subprocess.Popen[str]], timeout: float) -> list[str]:
    """Each run's output, all of them within `timeout` seconds in all.  Past it, every run still
    going is killed and reaped before `subprocess.TimeoutExpired` is raised: a hung load
    generator never outlives its round."""
    deadline = time.monotonic() + timeout
    outputs: list[str] = []
    try:
        for run in runs:
            outputs.append(run.communicate(timeout=max(0.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for run in runs:
            run.kill()
        for run in runs:
            run.communicate()
        raise
    return outputs


def wrk_together(
    targets: Sequence[tuple[int, str]],
    connections: int,
    seconds: float,
    headers: Sequence[str] = (),
) -> list[Round]:
    """One wrk per (pid, url), all started at once: the peers, pinned to the one proxy core,
    share it for the whole round, so whatever slows the machine meanwhile slows each alike and
    their req/s ratio is the ratio of their costs per request (the scheduler gives each peer's
    session an equal share of the core: kernel.sched_autogroup_enabled, each peer in a session
    of its own)."""
    before = [cpu_seconds(pid) for pid, _ in targets]
    runs = [
        subprocess.Popen(
            _wrk_argv(url, connections, seconds, headers),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _, url in targets
    ]
    # every wrk is waited for before any failure is raised: none is left running
    outputs = collect(runs, seconds + 30)
    failed = [run.returncode for run in runs if run.returncode != 0]
    if failed:
        raise RuntimeError(f"wrk exited with status {failed[0]}")
    return [
        _round(output, cpu_seconds(pid) - start)
        for output, (pid, _), start in zip(outputs, targets, before, strict=True)
    ]


#: what `openssl s_time -www /` sends on each connection (apps/s_time.c): HTTP/1.0 and no Host,
#: so the peer answers and closes; s_time reads until the close
S_TIME_REQUEST = b"GET / HTTP/1.0\r\n\r\n"
#: s_time processes run at once for one measurement.  s_time makes one connection at a time;
#: measured on the 2-core VM (full handshakes, 3 s), one process gave the gateway ~240-290 and
#: nginx ~300-380 connections/s with both cores half idle, four gave ~480-540 and ~580-650 (x1.7-2)
#: with the load core 95 % busy — and resumed handshakes gained as much (~240 -> ~430 for the
#: gateway).  So four, in both modes (full and resumed stay comparable).  A proxy core is then
#: 50-70 % busy: Debian's OpenSSL 3.0 spends about as much CPU on the client's side of a
#: handshake (~1 ms) as on the server's, so one load core cannot saturate one proxy core, and
#: connections/s is bounded by the client for the cheaper peers.  CPU µs per connection, from the
#: proxy's own counters, is the figure that compares the proxies' costs.
S_TIME_PROCESSES = 4


@dataclass(frozen=True)
class STime:
    """What one `openssl s_time` run reports about itself."""

    connections: int
    bytes_read: int
    #: connections that resumed the session (`-reuse`): s_time prints one mark per connection,
    #: "r" when resumed, "*" for a new TLS 1.3 session ("t", "3" for TLS 1.0, SSL 3)
    resumed: int


# "573 connections in 0.66s; 868.18 connections/user sec, bytes read 88815": the seconds are the
# client's user CPU.  The next line's "N connections in T real seconds" has T in whole seconds of
# time(), and a run lasts from -time to -time + 1 s, so neither times the run: the caller does.
_S_TIME_TOTALS = re.compile(
    r"^(\d+) connections in [\d.]+s; \S+ connections/user sec, bytes read (\d+)$", re.M
)
_S_TIME_MARKS = re.compile(r"^[r*t3]+$", re.M)


def parse_s_time(output: str) -> STime:
    """The totals of one `s_time -new` or `-reuse` run, and how many connections resumed."""
    totals = _S_TIME_TOTALS.search(output)
    if totals is None:
        raise ValueError(f"no totals in s_time's output: {output[-300:]!r}")
    marks = "".join(_S_TIME_MARKS.findall(output))
    return STime(int(totals.group(1)), int(totals.group(2)), marks.count("r"))


def _s_time_argv(
    port: int, certs: Path, seconds: float, resume: bool, client_cert: bool
) -> list[str]:
    argv = [
        "openssl",
        "s_time",
        "-connect",
        f"127.0.0.1:{port}",
        "-CAfile",
        str(certs / "ca.crt"),
        "-www",
        "/",
        "-reuse" if resume else "-new",
        "-time",
        str(max(1, round(seconds))),
    ]
    if client_cert:
        argv += ["-cert", str(certs / "client.crt"), "-key", str(certs / "client.key")]
    return pinned(LOAD_CORE, argv)


def s_time_round(
    pid: int,
    port: int,
    certs: Path,
    seconds: float,
    *,
    resume: bool,
    client_cert: bool,
    answer_bytes: int,
    processes: int = S_TIME_PROCESSES,
) -> tuple[Round, int]:
    """`processes` s_time runs at once against the peer on `port`, each making new connections
    (`resume`: resuming its first connection's session) with one GET each, and how many of the
    connections resumed.  The Round has connections for requests, connections per second (of
    the wall-clock time of the whole run, timed here) for rps and the peer's CPU µs per
    connection; s_time measures no latencies (0).

    s_time checks no answer, so the answers are checked by their size: every connection should
    read `answer_bytes` (the peer's 200 to the same request, see `handshake_check`).  A refused
    client certificate reads 0 bytes (TLS 1.3 completes the client's handshake before the
    server verifies it), a 502 about twice as many; a round whose connections read on average
    more than 5 % off (request ids vary by a digit or two) counts all its connections as errors."""
    argv = _s_time_argv(port, certs, seconds, resume, client_cert)
    before = cpu_seconds(pid)
    started = time.monotonic()
    runs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(processes)
    ]
    # every run is waited for before any failure is raised: none is left running
    outputs = collect(runs, seconds + 30)
    elapsed = time.monotonic() - started
    cpu_used = cpu_seconds(pid) - before
    for run, output in zip(runs, outputs, strict=True):
        if run.returncode != 0:
            raise RuntimeError(f"s_time exited with status {run.returncode}: {output[-300:]!r}")
    parsed = [parse_s_time(output) for output in outputs]
    connections = sum(p.connections for p in parsed)
    if connections == 0:
        raise RuntimeError("s_time made no connection")
    round_ = Round(
        requests=connections,
        rps=connections / elapsed,
        p50_ms=0.0,
        p99_ms=0.0,
        cpu_us_per_request=cpu_used * 1e6 / connections,
        errors=misread(connections, sum(p.bytes_read for p in parsed), answer_bytes),
    )
    return round_, sum(p.resumed for p in parsed)


def misread(connections: int, bytes_read: int, answer_bytes: int) -> int:
    """The connections counted as errors: all of them when they read on average more than 5 %
    more or less than `answer_bytes`, none otherwise."""
    off = abs(bytes_read / max(connections, 1) - answer_bytes) > 0.05 * answer_bytes
    return connections if off else 0
