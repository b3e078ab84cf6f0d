"""Scenarios: what load, against which peers, compared how.  Add one by adding a `Scenario`."""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import socket
import ssl
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.headers import REQUEST_HEADERS
from bench.otlp_sink import counts, endpoint
from bench.peers import OPERATOR_KEY, OPERATOR_ORIGIN, PEERS, Context
from bench.runner import (
    LOAD_CORE,
    PROXY_CORE,
    S_TIME_REQUEST,
    Result,
    client_tls,
    free_port,
    last_lines,
    measured_pid,
    peak_rss_mib,
    rss_mib,
    running,
    s_time_round,
    wait_http,
    wrk_round,
    wrk_together,
)
from bench.tokens import mint
from gateway.dev_certificates import init_dev_certificates

NO_CONTEXT = Context()


@dataclass(frozen=True)
class Settings:
    rounds: int = 3
    seconds: float = 5.0
    connections: int = 50
    upstream_port: int = 0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    peers: tuple[str, ...]
    #: runs the scenario for the peers named (a subset of `peers`), one Result each
    run: Callable[[Scenario, list[str], Settings], list[Result]]
    #: gateway routes in the config (the measured request hits the last one)
    routes: int = 10
    path: str = "/"
    extra: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def started(
    scenario: Scenario,
    peer_name: str,
    upstream_port: int,
    result: Result,
    routes: int | None = None,
    context: Context = NO_CONTEXT,
) -> Iterator[tuple[int, int] | None]:
    """The peer running on core 0 and answering: (pid, port); None when it is not installed."""
    peer = PEERS[peer_name]
    if not peer.available():
        missing = "not set" if peer.needs == "BENCH_BASELINE" else "not installed"
        result.note = f"{peer.needs} {missing}"
        yield None
        return
    with tempfile.TemporaryDirectory(prefix=f"bench-{peer_name}-") as scratch:
        # a port found free may be taken again before the peer binds it (another peer's
        # outgoing connection): a peer that exits without answering gets one more port
        for attempt in (1, 2):
            port = free_port()
            launch = peer.build(
                Path(scratch), port, upstream_port, routes or scenario.routes, context
            )
            log = Path(scratch) / f"output-{attempt}.log"
            with running(launch.argv, peer.cores or PROXY_CORE, launch.env, log) as proc:
                try:
                    certs = Path(context.certs) if peer.mtls else None
                    wait_http(port, proc=proc, tls=peer.tls, certs=certs)
                except RuntimeError as exc:
                    if proc.poll() is not None and attempt == 1:
                        continue
                    raise RuntimeError(f"{exc}; its output: {last_lines(log)}") from None
                pid = measured_pid(proc)
                yield pid, port
                result.peak_rss_mib = peak_rss_mib(pid)
                return


def wrk_scenario(scenario: Scenario, peer_names: list[str], settings: Settings) -> list[Result]:
    """Every peer under the same wrk load, rounds interleaved (see `_interleaved`)."""
    entries = [
        (Result(peer=name, scenario=scenario.name), name, scenario.routes) for name in peer_names
    ]
    _interleaved(scenario, entries, settings)
    return [result for result, _, _ in entries]


def routes_scenario(scenario: Scenario, peer_names: list[str], settings: Settings) -> list[Result]:
    """The gateway with 10 routes and with `scenario.routes`, interleaved; the second carries
    its throughput as a ratio to the first (SPEC §12: >= 0.9)."""
    few = Result(peer="gateway (10 routes)", scenario=scenario.name)
    many = Result(peer=f"gateway ({scenario.routes:,} routes)", scenario=scenario.name)
    _interleaved(scenario, [(few, "gateway", 10), (many, "gateway", scenario.routes)], settings)
    if few.rounds and many.rounds:
        many.figures["x_10_routes"] = many.median("rps") / few.median("rps")
    return [few, many]


def _interleaved(
    scenario: Scenario,
    entries: list[tuple[Result, str, int]],
    settings: Settings,
    *,
    context: Context = NO_CONTEXT,
    headers: Sequence[str] = (),
    check: Callable[[str, str], None] | None = None,
    together: bool = False,
) -> None:
    """Start every entry's peer, warm each up, then run the rounds interleaved: round 1 of
    each, then round 2 of each, and so on (the starting one rotating), so a slow minute on a
    shared machine costs every peer alike instead of whichever happened to be measured then.
    With `together`, as many rounds again follow with every peer loaded at once on the one
    proxy core (`wrk_together`): a slow second costs them all alike too.

    Every request carries `headers`; `check(peer name, url)`, when given, runs once per peer
    before the warm-up and raises when the peer does not answer as it should (the peer then
    gets a note instead of figures).  The peers are stopped when this returns."""
    with contextlib.ExitStack() as stack:
        live: list[tuple[Result, int, str]] = []
        for result, name, routes in entries:
            print(f"bench: {scenario.name} / {result.peer} starting", file=sys.stderr, flush=True)
            try:
                peer = stack.enter_context(
                    started(scenario, name, settings.upstream_port, result, routes, context)
                )
                if peer is not None and check is not None and not PEERS[name].mtls:
                    check(name, peer_url(name, peer[1], scenario.path))
            except Exception as exc:
                # one peer failing to start must not cost the others their figures
                result.note = f"failed: {exc!r}"
                continue
            if peer is not None:
                pid, port = peer
                url = peer_url(name, port, scenario.path)
                if PEERS[name].mtls:
                    # wrk cannot present a client certificate: haproxy does it for wrk
                    front = stack.enter_context(client_certificate_front(port, context.certs))
                    url = f"http://127.0.0.1:{front}{scenario.path}"
                live.append((result, pid, url))
        for result, pid, url in live:
            warmup = wrk_round(pid, url, settings.connections, min(1.0, settings.seconds), headers)
            result.warmup_requests = warmup.requests
        for index in range(settings.rounds):
            shift = index % len(live) if live else 0
            for result, pid, url in live[shift:] + live[:shift]:
                result.rounds.append(
                    wrk_round(pid, url, settings.connections, settings.seconds, headers)
                )
        if together and len(live) > 1:
            for _ in range(settings.rounds):
                rounds = wrk_together(
                    [(pid, url) for _, pid, url in live],
                    settings.connections,
                    settings.seconds,
                    headers,
                )
                for (result, _, _), one in zip(live, rounds, strict=True):
                    result.together.append(one)


def peer_url(name: str, port: int, path: str) -> str:
    """The measured URL of a peer listening on `port`: https for a TLS peer."""
    scheme = "https" if PEERS[name].tls else "http"
    return f"{scheme}://127.0.0.1:{port}{path}"


@contextlib.contextmanager
def bench_certificates() -> Iterator[str]:
    """A CA, a P-256 server certificate for 127.0.0.1 and localhost, and a client certificate,
    made for this run (gateway.dev_certificates) in a directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-certs-") as scratch:
        init_dev_certificates(Path(scratch), ["localhost", "127.0.0.1"])
        yield scratch


@contextlib.contextmanager
def client_certificate_front(port: int, certs: str) -> Iterator[int]:
    """haproxy on the load core taking wrk's plain HTTP and sending it on over TLS with the
    bench's client certificate to the peer on `port` (keep-alive, one server connection per
    client connection): its port.  Its CPU is the load core's, not the measured peer's."""
    front = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-front-") as scratch:
        pem = Path(scratch) / "client.pem"
        pem.write_bytes(
            Path(certs, "client.crt").read_bytes() + Path(certs, "client.key").read_bytes()
        )
        config = Path(scratch) / "front.cfg"
        config.write_text(
            "global\n  nbthread 1\n  maxconn 8000\n"
            "defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n"
            "  timeout server 60s\n"
            f"frontend front\n  bind 127.0.0.1:{front}\n  default_backend peer\n"
            f"backend peer\n  server peer 127.0.0.1:{port} ssl verify required"
            f" ca-file {certs}/ca.crt crt {pem} sni str(localhost) alpn http/1.1\n"
        )
        with running(["haproxy", "-db", "-f", str(config)], LOAD_CORE):
            wait_http(front)
            yield front


def tls_scenario(scenario: Scenario, peer_names: list[str], settings: Settings) -> list[Result]:
    """`wrk_scenario` over HTTPS (keep-alive: the handshakes are a few per connection, the
    records are what is measured), rounds run together too; ratios to nginx."""
    entries = [
        (Result(peer=name, scenario=scenario.name), name, scenario.routes) for name in peer_names
    ]
    with bench_certificates() as certs:
        _interleaved(scenario, entries, settings, context=Context(certs=certs), together=True)
    _reference_ratios(scenario, entries)
    return [result for result, _, _ in entries]


def large_headers_scenario(
    scenario: Scenario, peer_names: list[str], settings: Settings
) -> list[Result]:
    """`wrk_scenario` with 40 request headers on every request and 20 response headers from
    the upstream (bench/headers.py), rounds run together too; ratios to nginx."""
    entries = [
        (Result(peer=name, scenario=scenario.name), name, scenario.routes) for name in peer_names
    ]
    _interleaved(scenario, entries, settings, headers=REQUEST_HEADERS, together=True)
    _reference_ratios(scenario, entries)
    return [result for result, _, _ in entries]


#: the handshakes scenario's measurements of each peer: (label, resume the session)
HANDSHAKE_MODES = (("full", False), ("resumed", True))


@dataclass
class _Handshakes:
    """One peer in one mode of the handshakes scenario, while its rounds run."""

    result: Result
    pid: int
    port: int
    resume: bool
    #: the peer asks for the client's certificate: s_time presents it
    client_cert: bool
    #: the size of the peer's 200 to s_time's request (`handshake_check`)
    answer_bytes: int
    #: connections s_time saw resumed, over the rounds
    resumed: int = 0


def handshakes_scenario(
    scenario: Scenario, peer_names: list[str], settings: Settings
) -> list[Result]:
    """New TLS connections per second, each doing one small GET (`openssl s_time -www /` on the
    load core, `S_TIME_PROCESSES` at once: see there), two Results per peer: `NAME (full)`, a
    new session each time (`-new`), and `NAME (resumed)`, each resuming a session of the
    process's connection before (`-reuse`, TLS 1.3 session tickets).  An mTLS peer is connected
    to with the bench client's certificate.  The Rounds are reused: requests are connections, rps
    connections per second, CPU µs per request per connection, no latencies; the figures say so
    again (`connections_per_s`, `cpu_us_per_connection`), `x_nginx` is the ratio to nginx's
    same mode (nginx+mtls's for an mTLS peer) and `resumed_percent` what s_time saw resumed.

    Every peer is started at once, checked (`handshake_check`) and warmed up with a second of
    full handshakes; then the rounds rotate across every (peer, mode) as `_interleaved` does.  A
    peer that does not resume a session offered gets a note on its resumed row instead of rounds
    that would be full handshakes by another name."""
    results: list[Result] = []
    live: list[_Handshakes] = []
    with bench_certificates() as scratch, contextlib.ExitStack() as stack:
        certs = Path(scratch)
        for name in peer_names:
            full, resumed = (
                Result(peer=f"{name} ({label})", scenario=scenario.name)
                for label, _ in HANDSHAKE_MODES
            )
            results += [full, resumed]
            print(f"bench: {scenario.name} / {name} starting", file=sys.stderr, flush=True)
            try:
                entries = _handshake_peer(stack, scenario, name, settings, certs, full, resumed)
            except Exception as exc:
                # one peer failing to start must not cost the others their figures
                full.note = resumed.note = f"failed: {exc!r}"
                continue
            live += entries
        for index in range(settings.rounds):
            shift = index % len(live) if live else 0
            for entry in live[shift:] + live[:shift]:
                try:
                    one, resumed_count = s_time_round(
                        entry.pid,
                        entry.port,
                        certs,
                        settings.seconds,
                        resume=entry.resume,
                        client_cert=entry.client_cert,
                        answer_bytes=entry.answer_bytes,
                    )
                except Exception as exc:
                    entry.result.note = f"failed: {exc!r}"
                    continue
                entry.result.rounds.append(one)
                entry.resumed += resumed_count
            live = [entry for entry in live if not entry.result.note]
    _handshake_figures(peer_names, results, live)
    return results


def _handshake_peer(
    stack: contextlib.ExitStack,
    scenario: Scenario,
    name: str,
    settings: Settings,
    certs: Path,
    full: Result,
    resumed: Result,
) -> list[_Handshakes]:
    """Start, check and warm up one peer (stopped with `stack`): its modes to measure."""
    peer = stack.enter_context(
        started(scenario, name, settings.upstream_port, full, context=Context(certs=str(certs)))
    )
    if peer is None:
        resumed.note = full.note
        return []
    pid, port = peer
    client_cert = PEERS[name].mtls
    answer_bytes, resumes = handshake_check(port, certs, client_cert)
    warmup, _ = s_time_round(
        pid,
        port,
        certs,
        min(1.0, settings.seconds),
        resume=False,
        client_cert=client_cert,
        answer_bytes=answer_bytes,
    )
    full.warmup_requests = warmup.requests
    entries = [_Handshakes(full, pid, port, False, client_cert, answer_bytes)]
    if resumes:
        entries.append(_Handshakes(resumed, pid, port, True, client_cert, answer_bytes))
    else:
        resumed.note = (
            "no resumption: a connection offering the session of the one before got a new one"
        )
    return entries


def _handshake_figures(
    peer_names: list[str], results: list[Result], measured: list[_Handshakes]
) -> None:
    """The figures of the handshakes scenario's Results (see `handshakes_scenario`)."""
    by_peer = {result.peer: result for result in results}
    resumed = {entry.result.peer: entry.resumed for entry in measured if entry.resume}
    for name in peer_names:
        reference = "nginx+mtls" if PEERS[name].mtls else "nginx+tls"
        full = by_peer[f"{name} (full)"]
        for label, _ in HANDSHAKE_MODES:
            result = by_peer[f"{name} ({label})"]
            # both modes ran in the one process: each row gets the peak `started` measured
            result.peak_rss_mib = full.peak_rss_mib
            if not result.rounds:
                continue
            result.figures["connections_per_s"] = result.median("rps")
            result.figures["cpu_us_per_connection"] = result.median("cpu_us_per_request")
            nginx = by_peer.get(f"{reference} ({label})")
            if nginx is not None and nginx.rounds:
                result.figures["x_nginx"] = result.median("rps") / nginx.median("rps")
            if result.peer in resumed:
                connections = sum(r.requests for r in result.rounds)
                result.figures["resumed_percent"] = 100 * resumed[result.peer] / connections


def s_time_client(certs: Path, client_cert: bool) -> ssl.SSLContext:
    """A client like s_time's: trusts the bench's CA, sends no server name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(certs / "ca.crt")
    if client_cert:
        context.load_cert_chain(certs / "client.crt", certs / "client.key")
    return context


def s_time_exchange(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """s_time's request on a new connection, offering `session`: the whole answer (the peer
    closes after an HTTP/1.0 one), the session to offer next time (its ticket arrived with the
    answer) and whether this connection resumed the one offered."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, session=session) as tls,
    ):
        tls.sendall(S_TIME_REQUEST)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        return answer, tls.session, bool(tls.session_reused)


def handshake_check(port: int, certs: Path, client_cert: bool) -> tuple[int, bool]:
    """Before a peer's handshakes are measured, with s_time's request: it is answered 200 (with
    the client certificate when the peer asks for one), and the size of that answer is what
    every measured connection must read (`s_time_round`); an mTLS peer does not answer 200
    without the certificate (one that did would make its rows plain TLS); and a second
    connection offering the first's session resumes it.  (answer size, resumed)"""
    context = s_time_client(certs, client_cert)
    answer, session, _ = s_time_exchange(port, context)
    status = answer.split(b"\r\n", 1)[0]
    if not re.fullmatch(rb"HTTP/1\.[01] 200 .*", status):
        raise RuntimeError(f"answered {status[:40]!r}, not 200, to s_time's request")
    if client_cert:
        try:
            refused = s_time_exchange(port, s_time_client(certs, False))[0]
        except OSError:  # refused at the handshake (TLS alert) or by a reset
            refused = b""
        if refused.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            raise RuntimeError("answered 200 to a client without a certificate")
    again, _, resumed = s_time_exchange(port, context, session)
    if not again.startswith(status):
        raise RuntimeError(f"answered {again[:40]!r} on the resumed connection")
    return len(answer), resumed


def together_ratio(result: Result, reference: Result) -> float:
    """The median over the rounds run together of `result`'s req/s ÷ `reference`'s in the
    same round (0.0 without such rounds)."""
    ratios = [
        mine.rps / theirs.rps
        for mine, theirs in zip(result.together, reference.together, strict=False)
        if theirs.rps
    ]
    return float(statistics.median(ratios)) if ratios else 0.0


def together_cpu_ratio(result: Result, reference: Result) -> float:
    """The median over the rounds run together of `reference`'s CPU µs per request ÷
    `result`'s in the same round (0.0 without such rounds).  Steadier than the req/s ratio:
    identical gateways loaded together on one core came out 0.96-1.07 of each other in req/s
    (the scheduler's shares are not equal) but within ±1.5 % in CPU per request."""
    ratios = [
        theirs.cpu_us_per_request / mine.cpu_us_per_request
        for mine, theirs in zip(result.together, reference.together, strict=False)
        if mine.cpu_us_per_request and theirs.cpu_us_per_request
    ]
    return float(statistics.median(ratios)) if ratios else 0.0


def _status(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, headers=headers)
    try:
        context = client_tls() if url.startswith("https:") else None
        with urllib.request.urlopen(request, timeout=5, context=context) as answer:
            answer.read()
            return int(answer.status)
    except urllib.error.HTTPError as error:
        error.read()
        return int(error.code)


def answers_with(headers: Sequence[str]) -> Callable[[str, str], None]:
    """A check that the peer answers 200 to the measured request with `headers`, and, when it
    authenticates, 401 without them: a route refusing every request would look fast."""
    sent = dict(header.split(": ", 1) for header in headers)

    def check(peer: str, url: str) -> None:
        status = _status(url, sent)
        if status != 200:
            raise RuntimeError(f"answered {status}, not 200, to the measured request")
        if PEERS[peer].authenticates and (status := _status(url, {})) != 401:
            raise RuntimeError(f"answered {status}, not 401, to a request without the token")

    return check


@contextlib.contextmanager
def otlp_sink() -> Iterator[int]:
    """bench/otlp_sink.py running on the load core (not the proxy's) and answering: its port."""
    port = free_port()
    with running([sys.executable, "-m", "bench.otlp_sink", str(port)], LOAD_CORE):
        wait_http(port)
        yield port


@contextlib.contextmanager
def redis_server() -> Iterator[int]:
    """A redis-server on the load core (the upstream's), nothing persisted: its port."""
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    with tempfile.TemporaryDirectory() as scratch, running([*argv, "--dir", scratch], LOAD_CORE):
        deadline = time.monotonic() + 20
        while not _redis_answers(port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on {port}")
            time.sleep(0.05)
        yield port


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_scripts(port: int) -> int:
    """How many scripts (leases) Redis has run, from its own INFO commandstats: EVALSHA calls
    less those that found the script not loaded yet."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"INFO commandstats\r\n")
        head = b""
        while b"\r\n" not in head:
            head += sock.recv(64)
        size_line, _, data = head.partition(b"\r\n")
        size = int(size_line[1:])
        while len(data) < size:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    match = re.search(rb"cmdstat_evalsha:(\S+)", data)
    if match is None:
        return 0
    fields = dict(item.split(b"=") for item in match.group(1).split(b","))
    return int(fields[b"calls"]) - int(fields.get(b"failed_calls", b"0"))


def _reference_ratios(scenario: Scenario, entries: list[tuple[Result, str, int]]) -> None:
    """Each peer's req/s as a ratio to `extra["reference"]`'s (`x_<reference_label>`, and
    `_together` over the rounds run together), its CPU per request likewise (`_cpu`,
    `_cpu_together`: the reference's ÷ the peer's), and its req/s to nginx's over the rounds
    run together."""
    reference = next(
        (r for r, name, _ in entries if name == scenario.extra.get("reference") and r.rounds), None
    )
    if reference is not None:
        label = scenario.extra.get("reference_label", reference.peer)
        for result, _, _ in entries:
            if result is not reference and result.rounds and result.peer != "nginx":
                result.figures[f"x_{label}"] = result.median("rps") / reference.median("rps")
                # the cost ratio, which holds when the load core, not the proxy's, is the limit
                cpu = result.median("cpu_us_per_request")
                if cpu:
                    result.figures[f"x_{label}_cpu"] = reference.median("cpu_us_per_request") / cpu
                if result.together:
                    result.figures[f"x_{label}_together"] = together_ratio(result, reference)
                    result.figures[f"x_{label}_cpu_together"] = together_cpu_ratio(
                        result, reference
                    )
    nginx = next((r for r, name, _ in entries if name == "nginx" and r.together), None)
    if nginx is not None:
        for result, _, _ in entries:
            if result is not nginx and result.together:
                result.figures["x_nginx_together"] = together_ratio(result, nginx)


def redis_scenario(scenario: Scenario, peer_names: list[str], settings: Settings) -> list[Result]:
    """`wrk_scenario` with a redis-server on the load core for the peer limiting through a
    redis store.  Figures: the peers' ratios to the memory-store peer, and the scripts (lease
    round trips) Redis ran per 1,000 requests of the redis peer, from Redis's own statistics."""
    entries = [
        (Result(peer=name, scenario=scenario.name), name, scenario.routes) for name in peer_names
    ]
    with redis_server() as port:
        context = Context(redis_url=f"redis://127.0.0.1:{port}/0")
        _interleaved(scenario, entries, settings, context=context, together=True)
        scripts = redis_scripts(port)
    for result, name, _ in entries:
        if name == "gateway+redis-limit" and result.rounds:
            requests = (
                sum(r.requests for r in (*result.rounds, *result.together)) + result.warmup_requests
            )
            result.figures["redis_round_trips_per_1000_requests"] = (
                1000 * scripts / max(requests, 1)
            )
    _reference_ratios(scenario, entries)
    return [result for result, _, _ in entries]


def operator_scenario(
    scenario: Scenario, peer_names: list[str], settings: Settings
) -> list[Result]:
    """`wrk_scenario` with every request carrying the operator peer's API key and an allowed
    Origin (to every peer, so all send the same bytes), the peers checked first (200 with them,
    401 without for the one that authenticates), rounds run together too; ratios to nginx."""
    entries = [
        (Result(peer=name, scenario=scenario.name), name, scenario.routes) for name in peer_names
    ]
    headers = (f"X-API-Key: {OPERATOR_KEY}", f"Origin: {OPERATOR_ORIGIN}")
    _interleaved(
        scenario, entries, settings, headers=headers, check=answers_with(headers), together=True
    )
    _reference_ratios(scenario, entries)
    return [result for result, _, _ in entries]


def traced_scenario(scenario: Scenario, peer_names: list[str], settings: Settings) -> list[Result]:
    """`wrk_scenario` with a live OTLP receiver for the traced peers and, when a peer
    authenticates, a fresh ES256 key (its JWKS given to the peers) and a token sent with every
    request by wrk, to every peer.  Figures: `spans_received` by each traced peer's receiver
    (counted after the peer stopped: it exports what is queued at shutdown) and
    `spans_per_100_requests` (warm-up included: ~2 x the sampled percentage, one SERVER and one
    CLIENT span per request); the peers other than `extra["reference"]` also get their req/s as
    a ratio to it, `x_<extra["reference_label"]>`."""
    entries = [
        (Result(peer=name, scenario=scenario.name), name, scenario.routes) for name in peer_names
    ]
    headers: tuple[str, ...] = ()
    jwks = b""
    if any(PEERS[name].authenticates for name in peer_names):
        credentials = mint()
        headers, jwks = (credentials.header,), credentials.jwks
    traced = [result for result, name, _ in entries if PEERS[name].traced]
    with otlp_sink() as sink, contextlib.ExitStack() as stack:
        certs = ""
        if any(PEERS[name].tls for name in peer_names):
            certs = stack.enter_context(bench_certificates())
        context = Context(jwks=jwks, otlp_endpoint=endpoint(sink), certs=certs)
        _interleaved(
            scenario,
            entries,
            settings,
            context=context,
            headers=headers,
            check=answers_with(headers),
            together=True,
        )
        received = counts(sink)
    spans = received["spans"]
    assert isinstance(spans, dict)
    for result in traced:
        if result.rounds:
            count = int(spans.get(result.peer, 0))
            requests = (
                sum(r.requests for r in (*result.rounds, *result.together)) + result.warmup_requests
            )
            result.figures["spans_received"] = count
            result.figures["spans_per_100_requests"] = 100 * count / max(requests, 1)
    _reference_ratios(scenario, entries)
    return [result for result, _, _ in entries]


def each_peer(
    one: Callable[[Scenario, str, Settings], Result],
) -> Callable[[Scenario, list[str], Settings], list[Result]]:
    """A scenario that measures one peer at a time (it loads the machine on its own)."""

    def run(scenario: Scenario, peer_names: list[str], settings: Settings) -> list[Result]:
        results = []
        for name in peer_names:
            print(f"bench: {scenario.name} / {name} …", file=sys.stderr, flush=True)
            try:
                results.append(one(scenario, name, settings))
            except Exception as exc:
                results.append(Result(peer=name, scenario=scenario.name, note=f"failed: {exc!r}"))
        return results

    return run


async def _hold_idle(port: int, count: int) -> list[asyncio.StreamWriter]:
    """Open `count` keep-alive connections, one answered request each, and keep them open."""
    writers: list[asyncio.StreamWriter] = []
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writers.append(writer)

    for start in range(0, count, 500):
        await asyncio.gather(*(one() for _ in range(min(500, count - start))))
    return writers


def idle_scenario(scenario: Scenario, peer_name: str, settings: Settings) -> Result:
    """RSS growth of the proxy holding 10,000 idle keep-alive client connections."""
    result = Result(peer=peer_name, scenario=scenario.name)
    count = int(scenario.extra.get("connections", "10000"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 1000)), hard))
    with started(scenario, peer_name, settings.upstream_port, result) as peer:
        if peer is None:
            return result
        pid, port = peer
        before = rss_mib(pid)

        async def hold() -> float:
            writers = await _hold_idle(port, count)
            grown = rss_mib(pid) - before
            for writer in writers:
                writer.close()
            return grown

        result.figures["rss_growth_mib"] = asyncio.run(hold())
        result.figures["idle_connections"] = count
    return result


STREAM_BYTES = 100 * 1024 * 1024


async def _transfer(port: int, size: int) -> tuple[float, float]:
    """Seconds to upload `size` bytes, then to download `size` bytes, through the proxy."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk = b"u" * (256 * 1024)
    started = loop.time()
    writer.write(b"POST /upload HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n" % size)
    sent = 0
    while sent < size:
        part = chunk[: min(len(chunk), size - sent)]
        writer.write(part)
        await writer.drain()
        sent += len(part)
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    upload = loop.time() - started
    started = loop.time()
    writer.write(b"GET /big?size=%d HTTP/1.1\r\nHost: bench\r\n\r\n" % size)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"download refused: {head[:40]!r}")
    received = 0
    while received < size:
        data = await reader.read(1 << 20)
        if not data:
            raise RuntimeError("connection closed during the download")
        received += len(data)
    download = loop.time() - started
    writer.close()
    return upload, download


def stream_scenario(scenario: Scenario, peer_name: str, settings: Settings) -> Result:
    """100 MiB up and 100 MiB down on one connection: throughput and the proxy's RSS growth."""
    result = Result(peer=peer_name, scenario=scenario.name)
    # our own upstream here: it reads a whole upload before answering, as a real service would
    # (nginx's `return` answers at once and discards the body, which cuts streaming proxies off)
    upstream_port = free_port()
    upstream_argv = [sys.executable, "-m", "bench.upstream", str(upstream_port)]
    with running(upstream_argv, LOAD_CORE):
        wait_http(upstream_port)
        with started(scenario, peer_name, upstream_port, result) as peer:
            if peer is None:
                return result
            pid, port = peer
            before = rss_mib(pid)
            peak = before

            async def measure() -> tuple[float, float]:
                nonlocal peak
                transfer = asyncio.ensure_future(_transfer(port, STREAM_BYTES))
                while not transfer.done():
                    peak = max(peak, rss_mib(pid))
                    await asyncio.sleep(0.02)
                return transfer.result()

            upload, download = asyncio.run(measure())
            mib = STREAM_BYTES / (1024 * 1024)
            result.figures["upload_mib_s"] = mib / upload
            result.figures["download_mib_s"] = mib / download
            result.figures["rss_growth_mib"] = peak - before
    return result


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="bare",
            description="bare route, 50 keep-alive connections, small body",
            peers=("gateway", "gateway@baseline", "nginx", "haproxy", "caddy", "aiohttp"),
            run=wrk_scenario,
        ),
        Scenario(
            name="pipeline",
            description="the bare request through rate_limit, circuit_breaker, retry and headers",
            peers=("gateway+pipeline", "gateway@baseline+pipeline", "gateway", "nginx"),
            run=wrk_scenario,
        ),
        Scenario(
            name="edge",
            description="the full edge: jwt, rate_limit, circuit_breaker, retry, headers, "
            "1 % traced to a live OTLP receiver",
            peers=("gateway+edge", "gateway", "nginx"),
            run=traced_scenario,
            extra={"reference": "gateway", "reference_label": "bare"},
        ),
        Scenario(
            name="edge-tls",
            description="the edge over TLS: mtls, jwt, rate_limit, circuit_breaker, retry, "
            "headers, 1 % traced; against nginx doing TLS with client certificates and proxy "
            "(wrk's requests reach both through haproxy presenting the client certificate)",
            peers=("gateway+edge-tls", "gateway+tls", "nginx+mtls"),
            run=traced_scenario,
            extra={"reference": "nginx+mtls", "reference_label": "nginx_mtls"},
        ),
        Scenario(
            name="tracing",
            description="the bare route with tracing off, at 1 % to a live OTLP receiver, "
            "and on with nothing sampled",
            peers=("gateway", "gateway+traced", "gateway+unsampled", "gateway@baseline+traced"),
            run=traced_scenario,
            extra={"reference": "gateway", "reference_label": "tracing_off"},
        ),
        Scenario(
            name="redis",
            description="the bare request through a rate limit on one hot key: in the worker's"
            " memory, shared through Redis (leases; Redis on the upstream's core), and nginx",
            peers=("gateway+limit", "gateway+redis-limit", "nginx"),
            run=redis_scenario,
            extra={"reference": "gateway+limit", "reference_label": "memory"},
        ),
        Scenario(
            name="operator",
            description="the bare request through cors, ip_filter and api_key (SPEC §5.8)",
            peers=("gateway+operator", "gateway@baseline+operator", "gateway", "nginx"),
            run=operator_scenario,
            extra={"reference": "gateway", "reference_label": "bare"},
        ),
        Scenario(
            name="tls",
            description="the bare route over HTTPS: TLS 1.3, P-256, 50 keep-alive connections",
            peers=(
                "gateway+tls",
                "gateway",
                "nginx+tls",
                "haproxy+tls",
                "caddy+tls",
                "gateway@baseline+tls",
            ),
            run=tls_scenario,
            extra={"reference": "nginx+tls", "reference_label": "nginx_tls"},
        ),
        Scenario(
            name="large-headers",
            description="40 request headers (a browser through a CDN, an API client) and 20 "
            "response headers",
            peers=("gateway", "gateway@baseline", "nginx", "haproxy", "caddy"),
            run=large_headers_scenario,
            path="/headers",
        ),
        Scenario(
            name="workers",
            description="the bare route with two workers on both cores (shared with the "
            "upstream and wrk): the gateway's --workers 2 against nginx's worker_processes 2",
            peers=("gateway+workers2", "nginx+workers2", "gateway", "nginx"),
            run=wrk_scenario,
        ),
        Scenario(
            name="handshakes",
            description="new TLS connections per second, one small GET each (openssl s_time):"
            " full and resumed handshakes, and both again with a client certificate (mTLS)",
            peers=(
                "gateway+tls",
                "nginx+tls",
                "haproxy+tls",
                "caddy+tls",
                "gateway+mtls",
                "nginx+mtls",
                "haproxy+mtls",
                "caddy+mtls",
                "gateway@baseline+tls",
                "gateway@baseline+mtls",
            ),
            run=handshakes_scenario,
        ),
        Scenario(
            name="routes10k",
            description="the bare request with 10,000 routes in the gateway's table",
            peers=("gateway",),
            run=routes_scenario,
            routes=10_000,
        ),
        Scenario(
            name="stream",
            description="100 MiB request body and 100 MiB response body, streamed",
            peers=("gateway", "nginx", "haproxy", "caddy", "aiohttp"),
            run=each_peer(stream_scenario),
        ),
        Scenario(
            name="idle10k",
            description="RSS growth holding 10,000 idle keep-alive client connections",
            peers=("gateway", "nginx", "haproxy", "caddy"),
            run=each_peer(idle_scenario),
            extra={"connections": "10000"},
        ),
    )
}
