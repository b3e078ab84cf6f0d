"""The composition root: start, reload, drain, stop.

`Gateway` owns the current `Snapshot` (one reference, swapped whole on reload), the listeners,
the admin server, and the state kept across reloads.  Reload follows Caddy's order: load and
validate off the loop, build everything, then swap in one assignment on the loop thread — or keep
the old snapshot and report why.  `check` runs the same load-and-build path and throws the result
away, so a config that passes `gateway check` cannot fail to load.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.admin import build_admin_app
from gateway.config.load import load_config
from gateway.config.model import GatewayConfig, LimitsConfig
from gateway.downstream.connection import HttpConnection
from gateway.downstream.listening import accept_pending, refuse_new_handshakes
from gateway.downstream.serving import ServerState
from gateway.errors import ConfigErrors
from gateway.observability.exposition import Registry, read_snapshots
from gateway.observability.logs import setup_logging
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.process import ProcessSampler, build_labels
from gateway.runtime.listen import listening_socket
from gateway.runtime.shared import SharedState
from gateway.runtime.snapshot import Snapshot, build_snapshot
from gateway.runtime.threads import in_own_thread
from gateway.stages.registry import KINDS
from gateway.status import build_status_app
from gateway.stores.base import StoreError
from gateway.stores.redis import RedisStore
from gateway.tls import front_context
from gateway.watch import FileWatcher
from gateway.web_listener import WebListener

log = logging.getLogger("gateway.app")

#: how often the connection sweeper checks deadlines (seconds); bounded by the shortest timeout
_SWEEP_MAX = 0.5
#: how often a worker publishes its metrics for the worker that serves /metrics
_METRICS_PUBLISH = 1.0
#: how long warming waits for one upstream connection before going ready anyway
_WARM_TIMEOUT = 1.0
#: draining: how long a listener that drops new SYNs keeps accepting before it closes, so that
#: handshakes already under way complete and are served (each needs one round trip more)
_HANDSHAKE_GRACE = 0.25
#: a listener's accept queue: bursts of new connections wait here rather than being refused
_BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class _Listener:
    """A bound listener and what a connection accepted by hand needs to be served like the rest."""

    server: asyncio.Server
    state: ServerState
    factory: Callable[[], HttpConnection]
    ssl: ssl.SSLContext | None
    handshake_timeout: float | None


class Gateway:
    """One worker process's gateway."""

    def __init__(
        self,
        config_path: str,
        *,
        worker_index: int = 0,
        workers: int = 1,
        metrics_dir: str | None = None,
        watch: bool = False,
    ) -> None:
        #: reload when the config or a file it references changes (SPEC §6)
        self.watch = watch
        self.watcher: FileWatcher | None = None
        # symlinks kept: a config mounted from a ConfigMap is a symlink that gets swapped
        self.config_path = os.path.abspath(config_path)
        self.worker_index = worker_index
        self.workers = workers
        self.metrics_dir = metrics_dir
        self.registry = Registry()
        self.metrics = GatewayMetrics(self.registry)
        self.metrics.build_info.set_info(*build_labels(__version__))
        self._process = ProcessSampler(self.metrics)
        self._state = "starting"
        self.draining = False
        self.connections: set[HttpConnection] = set()
        self.client_connections: dict[str, int] = {}
        #: each listener's view of `snapshot` and `draining`, kept in step by _install and drain
        self._states: list[ServerState] = []
        self.bound: dict[str, tuple[str, int]] = {}
        self.admin: WebListener | None = None
        #: the status listener (probes and /metrics only), when configured; worker 0 only
        self.status: WebListener | None = None
        self.last_reload: dict[str, Any] = {"ok": True, "error": None, "at": None}
        self._listeners: list[_Listener] = []
        #: connections accepted by hand while the listeners closed, until they are served
        self._handovers: set[asyncio.Task[Any]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._all_closed = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shared: SharedState | None = None
        self.snapshot: Snapshot

    @property
    def shared(self) -> SharedState:
        """What outlives reloads: live upstreams and stages, and retired upstreams draining."""
        assert self._shared is not None, "not started"
        return self._shared

    # -- AdminBackend ------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    def admin_token(self) -> str | None:
        return self.snapshot.config.admin.token

    def _current_limits(self) -> LimitsConfig:
        """The limits of the config in force (the admin and status listeners read them at each
        deadline, so a reload applies there too)."""
        return self.snapshot.limits

    def config_info(self) -> dict[str, Any]:
        return {
            "version": self.snapshot.version,
            "loaded_at": _rfc3339(self.snapshot.loaded_at),
            "source": self.snapshot.config.source,
            "last_reload": dict(self.last_reload),
        }

    def routes_info(self) -> list[dict[str, Any]]:
        return [route.describe() for route in self.snapshot.routes]

    def upstreams_info(self) -> list[dict[str, Any]]:
        snapshot = self.snapshot
        described = {name: u.describe() for name, u in snapshot.upstreams.items()}
        # each kind whose stages keep state per upstream has its list there ("circuit_breakers")
        sections = [f"{kind.name}s" for kind in KINDS.values() if kind.upstreams is not None]
        for name in described:
            described[name].update({section: [] for section in sections})
        for spec, stage in snapshot.stages.values():
            per_upstream = KINDS[spec.kind].upstreams
            if per_upstream is None:
                continue
            for upstream, state in per_upstream(stage).items():
                if upstream in described:
                    described[upstream][f"{spec.kind}s"].append({"stage": spec.label, **state})
        return list(described.values())

    def stores_info(self) -> list[dict[str, Any]]:
        """The shared stores of the live configuration, as this worker sees them."""
        return [
            store.describe()
            for store in self.snapshot.stores.values()
            if isinstance(store, RedisStore)
        ]

    def metrics_text(self, openmetrics: bool = False) -> str:
        """/metrics: the Prometheus text, or with `openmetrics` OpenMetrics text (exemplars
        included); with several workers, every worker's values merged."""
        extra: list[dict[str, Any]] = []
        if self.metrics_dir:
            self._publish_metrics()  # samples the process metrics too
            extra = read_snapshots(self.metrics_dir, exclude=self._metrics_file_name())
        else:
            self._process.sample()
        if openmetrics:
            return self.registry.render_openmetrics(extra=extra)
        return self.registry.render(extra=extra)

    async def reload(self) -> dict[str, Any]:
        result = await self._reload()
        if self.workers > 1 and self.worker_index == 0 and result["ok"]:
            # the supervisor passes the reload on to the other workers
            with contextlib.suppress(ProcessLookupError):
                os.kill(os.getppid(), signal.SIGUSR1)
        return result

    # -- start -------------------------------------------------------------------------------

    def _load(self) -> GatewayConfig:
        """The config file and every file it references, read and checked (on a thread of its
        own: gateway.runtime.threads)."""
        return load_config(self.config_path, KINDS)

    async def start(self) -> None:
        """Load the config, bind the listeners and the admin, warm up; raises on failure."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._shared = SharedState(loop, self.metrics)
        self._shared.version = __version__
        config = await in_own_thread("config-load", self._load)
        snapshot = build_snapshot(config, self._shared)
        self._shared.commit(snapshot.upstreams, snapshot.stages, snapshot.tracer, snapshot.stores)
        self._install(snapshot)
        try:
            for listener in config.listeners:
                tls = listener.tls is not None
                state = ServerState(self, loop, listener.name, "https" if tls else "http")
                self._states.append(state)
                factory = _factory(state)
                context = _front_context(state) if tls else None
                # a client that never completes its handshake is dropped like a slow head
                handshake_timeout = config.limits.header_timeout if tls else None
                reuse_port = self.workers > 1
                sock = listening_socket(
                    listener.host, listener.port, backlog=_BACKLOG, reuse_port=reuse_port
                )
                if sock is not None:
                    server = await loop.create_server(
                        factory,
                        sock=sock,
                        backlog=_BACKLOG,
                        ssl=context,
                        ssl_handshake_timeout=handshake_timeout,
                    )
                else:  # a host name: the loop resolves it
                    server = await loop.create_server(
                        factory,
                        listener.host,
                        listener.port,
                        reuse_port=reuse_port or None,
                        backlog=_BACKLOG,
                        ssl=context,
                        ssl_handshake_timeout=handshake_timeout,
                    )
                self._listeners.append(
                    _Listener(server, state, factory, context, handshake_timeout)
                )
                sockname = server.sockets[0].getsockname()
                self.bound[listener.name] = (sockname[0], sockname[1])
            # worker 0 alone serves admin and status: their ports are the process group's, so
            # /readyz is worker 0's state and /metrics sums what every worker publishes
            if self.worker_index == 0:
                self.admin = WebListener(
                    "admin",
                    build_admin_app(self),
                    config.admin.host,
                    config.admin.port,
                    logging.getLogger("aiohttp.server"),
                    self._current_limits,
                    self.metrics.connections_refused_total.labels("admin", "max_connections").inc,
                )
                await self.admin.start()
                if not config.admin.token and not is_loopback(config.admin.host):
                    # e.g. ${GATEWAY_ADMIN_TOKEN:-} with the variable unset
                    log.warning(
                        "the admin API listens on %s without a token: anyone who reaches it may"
                        " reload the gateway and read its configuration (set admin.token)",
                        config.admin.host,
                    )
                if config.status is not None:
                    self.status = WebListener(
                        "status",
                        build_status_app(self),
                        config.status.host,
                        config.status.port,
                        logging.getLogger("gateway.status"),
                        self._current_limits,
                        self.metrics.connections_refused_total.labels(
                            "status", "max_connections"
                        ).inc,
                    )
                    await self.status.start()
        except BaseException:
            await self._close_servers()
            raise
        self._tasks.append(loop.create_task(self._sweep()))
        if self.watch:
            self.watcher = FileWatcher(self._watched_files, self._reload)
            self._tasks.append(loop.create_task(self.watcher.run()))
        if self.metrics_dir:
            self._tasks.append(loop.create_task(self._publish_loop()))
        self._state = "warming"
        await self._warm()
        self._state = "ready"
        log.info(
            "gateway ready",
            extra={
                "version": snapshot.version,
                "listeners": {k: f"{h}:{p}" for k, (h, p) in self.bound.items()},
                "worker": self.worker_index,
            },
        )

    async def _warm(self) -> None:
        """Open one connection per endpoint so the first requests find warm pools."""

        async def one(pool: Any) -> None:
            try:
                conn = await pool.acquire(_WARM_TIMEOUT)
            except Exception as exc:  # warming is best effort: the endpoint may come later
                log.warning("upstream endpoint not reachable while warming: %s", exc)
                return
            pool.release(conn)

        async def connect(store: RedisStore) -> None:
            try:
                await store.ping()
            except StoreError as exc:  # the stages' on_store_error rules until it answers
                log.warning("store not reachable while warming: %s", exc)

        pools = [e.pool for u in self.snapshot.upstreams.values() for e in u.endpoints]
        stores = [s for s in self.snapshot.stores.values() if isinstance(s, RedisStore)]
        # JWKS URLs are fetched before ready, so the first tokens find their keys
        jwks = [
            warm(stage, _WARM_TIMEOUT)
            for spec, stage in self.snapshot.stages.values()
            if (warm := KINDS[spec.kind].warm) is not None
        ]
        if pools or jwks or stores:
            await asyncio.gather(*(one(p) for p in pools), *jwks, *(connect(s) for s in stores))

    def _watched_files(self) -> list[str]:
        return [self.config_path, *self.snapshot.config.files]

    def _install(self, snapshot: Snapshot) -> None:
        gauge = self.metrics.tls_certificate_not_after_seconds
        expiries = {
            f"{listener.name}:{Path(cert.cert).name}": cert.not_after
            for listener in snapshot.config.listeners
            if listener.tls is not None
            for cert in listener.tls.certificates
        }
        for values in list(gauge.children):
            if values[0] not in expiries:
                gauge.remove(*values)
        for name, not_after in expiries.items():
            gauge.labels(name).set(not_after)
        self.snapshot = snapshot
        for state in self._states:
            state.snapshot = snapshot
            state.https_redirect = snapshot.https_redirects.get(state.listener)
        self.metrics.config_info.set_info(snapshot.version)

    # -- reload ------------------------------------------------------------------------------

    async def _reload(self) -> dict[str, Any]:
        async with self._reload_lock:
            assert self._shared is not None
            at = _rfc3339(time.time())
            try:
                config = await in_own_thread("config-load", self._load)
                _check_restart_needed(self.snapshot.config, config)
                snapshot = build_snapshot(config, self._shared)
            except ConfigErrors as exc:
                return self._reload_failed(at, exc)
            except Exception as exc:
                log.exception("reload failed while building the new configuration")
                return self._reload_failed(at, ConfigErrors([]), str(exc))
            # the swap: one assignment; requests in flight keep the snapshot they started with
            old = self.snapshot
            self._install(snapshot)
            self._shared.commit(
                snapshot.upstreams, snapshot.stages, snapshot.tracer, snapshot.stores
            )
            self.last_reload = {"ok": True, "error": None, "at": at}
            self.metrics.config_reloads_total.labels("success").inc()
            self.metrics.config_last_reload_success.set(1)
            changed = old.version != snapshot.version
            log.info(
                "configuration reloaded",
                extra={
                    "version": snapshot.version,
                    "previous": old.version,
                    "changed": changed,
                    "worker": self.worker_index,
                },
            )
            return {"ok": True, "version": snapshot.version, "changed": changed, "error": None}

    def _reload_failed(
        self, at: str, exc: ConfigErrors, message: str | None = None
    ) -> dict[str, Any]:
        error = message or "\n".join(str(e) for e in exc.errors) or str(exc)
        self.last_reload = {"ok": False, "error": error, "at": at}
        self.metrics.config_reloads_total.labels("failure").inc()
        self.metrics.config_last_reload_success.set(0)
        log.error("reload rejected, the previous configuration keeps serving: %s", error)
        return {"ok": False, "version": self.snapshot.version, "error": error}

    # -- drain and stop ----------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def run_until_stopped(self) -> None:
        await self._stop_requested.wait()
        await self.drain()

    async def drain(self) -> None:
        """SPEC §7: not ready at once, keep accepting for drain_delay, then finish in-flight.

        No connection the kernel accepted is reset (see `_stop_accepting`); a request that
        reached us is answered, with `Connection: close`; an idle keep-alive connection is
        half-closed, so a request crossing that close sees a clean end of stream before any
        byte of an answer, which clients retry (`HttpConnection.close_if_idle`).
        """
        if self._state == "draining":
            await self._stopped.wait()
            return
        self._state = "draining"
        shutdown = self.snapshot.config.shutdown
        log.info("draining", extra={"drain_delay": shutdown.drain_delay})
        await asyncio.sleep(shutdown.drain_delay)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + shutdown.timeout
        await self._stop_accepting()
        if not await self._connections_closed(deadline):
            log.warning(
                "shutdown timeout: closing %d connections still open", len(self.connections)
            )
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.abort()
        await self.stop()

    async def _stop_accepting(self) -> None:
        """Stop accepting without resetting a connection the kernel already accepted.

        New SYNs are dropped first, while the loop goes on accepting for `_HANDSHAKE_GRACE`;
        then what is still queued is accepted by hand and the socket closed in the same step —
        no await between them, so nothing can join the queue in between (gateway/http/
        listening.py says why the socket cannot simply be closed).
        """
        # every socket of every listener (a host name may bind more than one address)
        filtered = [
            refuse_new_handshakes(sock) for x in self._listeners for sock in x.server.sockets
        ]
        self.draining = True
        for state in self._states:
            state.draining = True
        for conn in list(self.connections):
            conn.close_if_idle()
        if any(filtered):
            # handshakes under way complete meanwhile, and the loop accepts them as usual
            await asyncio.sleep(_HANDSHAKE_GRACE)
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            queued = [c for sock in listener.server.sockets for c in accept_pending(sock)]
            listener.server.close()
            for accepted in queued:
                self._hand_over(loop, listener, accepted)
        self._listeners = []

    def _hand_over(
        self, loop: asyncio.AbstractEventLoop, listener: _Listener, conn: socket.socket
    ) -> None:
        """Serve a connection accepted by hand exactly as the listener would have."""
        task = loop.create_task(
            loop.connect_accepted_socket(
                listener.factory,
                conn,
                ssl=listener.ssl,
                ssl_handshake_timeout=listener.handshake_timeout,
            )
        )
        self._handovers.add(task)
        task.add_done_callback(self._handed_over)

    def _handed_over(self, task: asyncio.Task[Any]) -> None:
        self._handovers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # e.g. a TLS handshake that failed: as with any connection the listener accepts
            log.debug("a connection accepted while draining failed: %s", task.exception())

    async def _connections_closed(self, deadline: float) -> bool:
        """Wait until every client connection has closed; False at `deadline`."""
        loop = asyncio.get_running_loop()
        if self._handovers:
            await asyncio.wait(self._handovers, timeout=max(deadline - loop.time(), 0))
        # connections the loop accepted before its listener closed have their connection_made
        # queued (call_soon) ahead of this task's next step: let them join `connections`
        await asyncio.sleep(0)
        if not self.connections:
            return True
        self._all_closed.clear()
        try:
            await asyncio.wait_for(self._all_closed.wait(), max(deadline - loop.time(), 0))
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._close_servers()
        for handover in list(self._handovers):
            # a TLS handshake still under way at the shutdown timeout: it ends with the rest
            handover.cancel()
        pending = [t for t in (c.abort() for c in list(self.connections)) if t is not None]
        if pending:
            # the aborted connections cancel their tasks; let them unwind (closing upstreams)
            await asyncio.gather(*pending, return_exceptions=True)
        if self._shared is not None:
            self._shared.close()
            await self._shared.close_stores()
            # what the tracers queued is exported (up to the exporter's timeout), off the loop
            await in_own_thread("tracer-close", self._shared.close_tracers)
        self.snapshot.access_log.flush()
        if self.metrics_dir:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.metrics_dir, self._metrics_file_name()))
        self._stopped.set()

    async def _close_servers(self) -> None:
        for listener in self._listeners:
            listener.server.close()
        self._listeners = []
        # admin and status close last, after the drain: /readyz says 503 until the very end
        for web_listener in (self.admin, self.status):
            if web_listener is not None:
                await web_listener.stop()
        self.admin = self.status = None

    def on_connection_closed(self) -> None:
        if not self.connections:
            self._all_closed.set()

    # -- background work ---------------------------------------------------------------------

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            limits = self.snapshot.limits
            shortest = min(limits.header_timeout, limits.idle_timeout, limits.body_timeout)
            await asyncio.sleep(min(_SWEEP_MAX, shortest / 4))
            now = loop.time()
            for conn in list(self.connections):
                conn.check_deadline(now)
            self.snapshot.access_log.flush()

    def _metrics_file_name(self) -> str:
        return f"worker-{self.worker_index}.json"

    def _publish_metrics(self) -> None:
        assert self.metrics_dir is not None
        self._process.sample()
        self.registry.write_snapshot(os.path.join(self.metrics_dir, self._metrics_file_name()))

    async def _publish_loop(self) -> None:
        while True:
            try:
                self._publish_metrics()
            except OSError as exc:
                log.warning("cannot publish metrics: %s", exc)
            await asyncio.sleep(_METRICS_PUBLISH)


def _factory(state: ServerState) -> Callable[[], HttpConnection]:
    return lambda: HttpConnection(state)


def _front_context(state: ServerState) -> ssl.SSLContext:
    name = state.listener
    # each handshake asks the listener's current snapshot: certificates reload live
    return front_context(lambda: state.snapshot.tls[name])


def _check_restart_needed(old: GatewayConfig, new: GatewayConfig) -> None:
    from gateway.errors import ConfigError

    errors = []
    # certificates, CA and TLS settings apply live; only the sockets themselves need a restart
    if [x.socket for x in old.listeners] != [x.socket for x in new.listeners]:
        errors.append(
            ConfigError("listeners", "listeners cannot change while running: restart needed")
        )
    if (old.admin.host, old.admin.port) != (new.admin.host, new.admin.port):
        errors.append(
            ConfigError(
                "admin.bind", "the admin address cannot change while running: restart needed"
            )
        )
    # like admin.bind: the listener is bound once, at start
    if old.status != new.status:
        if old.status is None or new.status is None:
            where, what = "status", "a status listener cannot be added or removed"
        else:
            where, what = "status.bind", "the status address cannot change"
        errors.append(ConfigError(where, f"{what} while running: restart needed"))
    if errors:
        raise ConfigErrors(errors)


def _rfc3339(epoch: float) -> str:
    t = time.gmtime(epoch)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(epoch % 1 * 1000):03d}Z"


# -- entry points used by the command line -------------------------------------------------


def check(config_path: str) -> tuple[str | None, list[str]]:
    """Load and build `config_path` exactly as a reload would; (version, errors)."""
    try:
        config = load_config(config_path, KINDS)
    except ConfigErrors as exc:
        return None, [str(e) for e in exc.errors]

    async def build() -> None:
        shared = SharedState(asyncio.get_running_loop(), GatewayMetrics(Registry()))
        snapshot = build_snapshot(config, shared)
        shared.discard(snapshot.upstreams, snapshot.tracer)

    try:
        asyncio.run(build())
    except ConfigErrors as exc:
        return None, [str(e) for e in exc.errors]
    return config.version, []


def serve(
    config_path: str,
    *,
    worker_index: int = 0,
    workers: int = 1,
    watch: bool = True,
    log_level: str = "info",
) -> int:
    """Run one gateway process until SIGTERM/SIGINT has drained it; the exit code."""
    import uvloop

    # a reload signal that arrives while starting must not kill the process (SIGHUP's default)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    setup_logging(log_level)
    metrics_dir = os.environ.get("GATEWAY_METRICS_DIR") if workers > 1 else None
    gateway = Gateway(
        config_path,
        worker_index=worker_index,
        workers=workers,
        metrics_dir=metrics_dir,
        watch=watch,
    )

    async def main() -> int:
        loop = asyncio.get_running_loop()
        # installed before starting, so a SIGTERM during start-up still drains cleanly
        loop.add_signal_handler(signal.SIGTERM, gateway.request_stop)
        loop.add_signal_handler(signal.SIGINT, gateway.request_stop)
        try:
            await gateway.start()
        except ConfigErrors as exc:
            for error in exc.errors:
                print(error, file=sys.stderr)
            log.error("configuration rejected: %d error(s)", len(exc.errors))
            return 1
        except OSError as exc:
            log.error("cannot start: %s", exc)
            return 1
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_reload_logged()))
        await gateway.run_until_stopped()
        log.info("stopped")
        return 0

    async def _reload_logged() -> None:
        await gateway._reload()

    return uvloop.run(main())


def is_loopback(host: str) -> bool:
    """Whether `host` (an admin listener's) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
