"""`gateway run --workers N`: a parent that starts N workers and keeps them running.

Each worker binds the listeners itself with SO_REUSEPORT, so the kernel spreads connections.
The parent forwards SIGHUP (reload) and SIGTERM/SIGINT (drain) to every worker, passes SIGUSR1
from worker 0 (which reloaded itself through POST /admin/reload) on to the others as SIGHUP,
and restarts a worker that dies, with a growing delay if it keeps dying.  It never serves a
request; its loop wakes on signals and child exits only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger("gateway.supervisor")

_POLL = 0.05
_BACKOFF_START = 0.1
_BACKOFF_MAX = 5.0
#: a worker that lived this long is considered healthy: its next crash restarts at once
_STABLE_AFTER = 10.0


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    started: float
    backoff: float = _BACKOFF_START
    restart_at: float | None = None


@dataclass
class _Signals:
    pending: list[int] = field(default_factory=list)

    def handler(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)


def _command(
    config_path: str,
    workers: int,
    index: int,
    prefix: list[str] | None,
    watch: bool,
    log_level: str = "info",
) -> list[str]:
    base = prefix or [sys.executable, "-m", "gateway"]
    return [
        *base,
        "run",
        "-c",
        config_path,
        "--workers",
        str(workers),
        "--worker-index",
        str(index),
        "--log-level",
        log_level,
        *([] if watch else ["--no-watch"]),
    ]


def supervise(
    config_path: str,
    workers: int,
    *,
    argv_prefix: list[str] | None = None,
    watch: bool = True,
    log_level: str = "info",
) -> int:
    """Run `workers` worker processes until SIGTERM/SIGINT; the exit code."""
    from gateway.observability.logs import setup_logging

    setup_logging(log_level)
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    env = dict(os.environ, GATEWAY_METRICS_DIR=metrics_dir)
    stop_timeout = float(os.environ.get("GATEWAY_SUPERVISOR_STOP_TIMEOUT", "60"))
    signals = _Signals()
    for forwarded in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(forwarded, signals.handler)

    def start(index: int) -> subprocess.Popen[bytes]:
        # a worker ignores SIGHUP (inherited through exec) until its loop handles reloads, so a
        # reload forwarded while it is still starting cannot kill it; it loads the newest config
        return subprocess.Popen(
            _command(config_path, workers, index, argv_prefix, watch, log_level),
            env=env,
            preexec_fn=_ignore_hup,
        )

    pool = [_Worker(i, start(i), time.monotonic()) for i in range(workers)]
    log.info("supervising %d workers", workers, extra={"pids": [w.proc.pid for w in pool]})
    stopping = False
    try:
        while True:
            while signals.pending:
                signum = signals.pending.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    stopping = True
                    _send(pool, signal.SIGTERM)
                elif signum == signal.SIGHUP:
                    _send(pool, signal.SIGHUP)
                elif signum == signal.SIGUSR1:
                    _send([w for w in pool if w.index != 0], signal.SIGHUP)
            if stopping:
                return _wait_all(pool, stop_timeout)
            now = time.monotonic()
            for worker in pool:
                if worker.restart_at is not None:
                    if now >= worker.restart_at:
                        worker.proc = start(worker.index)
                        worker.started = now
                        worker.restart_at = None
                        log.info(
                            "worker %d restarted", worker.index, extra={"pid": worker.proc.pid}
                        )
                    continue
                code = worker.proc.poll()
                if code is None:
                    continue
                lived = now - worker.started
                worker.backoff = (
                    _BACKOFF_START
                    if lived > _STABLE_AFTER
                    else min(worker.backoff * 2, _BACKOFF_MAX)
                )
                worker.restart_at = now + (0 if lived > _STABLE_AFTER else worker.backoff)
                log.warning(
                    "worker %d exited with %s; restarting",
                    worker.index,
                    code,
                    extra={"lived_s": round(lived, 3)},
                )
            time.sleep(_POLL)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _ignore_hup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _send(workers: list[_Worker], signum: int) -> None:
    for worker in workers:
        if worker.restart_at is None and worker.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signum)


def _wait_all(pool: list[_Worker], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    code = 0
    for worker in pool:
        if worker.restart_at is not None:
            continue  # it was dead already; nothing to drain
        remaining = max(deadline - time.monotonic(), 0.0)
        try:
            result = worker.proc.wait(remaining)
        except subprocess.TimeoutExpired:
            log.error("worker %d did not stop in time; killing it", worker.index)
            worker.proc.kill()
            result = worker.proc.wait()
        # killed by our SIGTERM before it could install its handler (still starting): clean too
        if result not in (0, -signal.SIGTERM):
            code = 1
    return code
