"""Active health checks: GET the configured path on every endpoint of an upstream, on a timer.

One task per upstream probes all its endpoints at once, then again `interval` (plus up to 10 %
random jitter, so a fleet of gateways does not probe in lockstep) after each round ends.  A probe
opens its own connection (never a pooled one: a fresh connect is part of what is checked), sends
a minimal request with `Connection: close` and passes on a 2xx or 3xx status line within
`timeout` of starting to connect; anything else fails, with a short reason kept for the admin
API.  Results feed a `HealthState` per endpoint and `on_change` hears only real changes.

Invariants: the connection is always closed (and aborted when closing would hang, so one bad
endpoint cannot hold up a round); nothing a probe or `on_change` raises ends the task; `close()`
is idempotent, safe before `start()`, and final.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import string
from collections.abc import Callable, Sequence
from typing import final
from urllib.parse import quote

from gateway.config.model import HealthCheckConfig
from gateway.core.health import HealthState

log = logging.getLogger("gateway.health")

# everything printable in ASCII stays as configured; only the rest is percent-encoded
_PATH_SAFE = string.punctuation


def _request(path: str, host: str, port: int) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (
        f"GET {quote(path, safe=_PATH_SAFE)} HTTP/1.1\r\nHost: {authority}\r\n"
        "User-Agent: gateway-health-check\r\nConnection: close\r\n\r\n"
    ).encode("ascii", "replace")


def _judge(line: bytes) -> str | None:
    """None when the status line passes, else why it does not."""
    if not line:
        return "connection closed"
    parts = line.split(None, 2)
    if (
        not line.endswith(b"\n")
        or len(parts) < 2
        or not parts[0].startswith(b"HTTP/")
        or len(parts[1]) != 3
        or not parts[1].isdigit()
    ):
        return "invalid response"
    status = int(parts[1])
    return None if 200 <= status < 400 else f"status {status}"


@final
class HealthChecker:
    __slots__ = (
        "_closed",
        "_errors",
        "_interval",
        "_loop",
        "_on_change",
        "_requests",
        "_server_name",
        "_states",
        "_targets",
        "_task",
        "_timeout",
        "_tls",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        config: HealthCheckConfig,
        targets: Sequence[tuple[str, int]],
        on_change: Callable[[int, bool], None],
        *,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        self._loop = loop
        self._interval = config.interval
        self._timeout = config.timeout
        self._targets = list(targets)
        self._on_change = on_change
        #: https endpoints are checked over TLS, verified as requests to them are
        self._tls = tls
        self._server_name = server_name
        self._states = [HealthState(config) for _ in self._targets]
        self._errors: list[str | None] = [None] * len(self._targets)
        # built once: the request never changes
        self._requests = [_request(config.path, host, port) for host, port in self._targets]
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def healthy(self, index: int) -> bool:
        return self._states[index].healthy

    def last_error(self, index: int) -> str | None:
        """Why the latest probe of endpoint `index` failed; None when it passed or none ran."""
        return self._errors[index]

    def start(self) -> None:
        """Begin probing, first round at once (idempotent; nothing after `close()`)."""
        if self._task is None and not self._closed:
            task = self._loop.create_task(self._run())
            task.add_done_callback(self._task_done)
            self._task = task

    def close(self) -> None:
        """Stop probing for good (idempotent)."""
        self._closed = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # retrieve the outcome so nothing is reported as "never retrieved"; _run catches what a
        # probe raises, so anything here is a bug worth a log line
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("health checking stopped", exc_info=exc)

    async def _run(self) -> None:
        count = len(self._targets)
        while True:
            await asyncio.gather(*[self._check(i) for i in range(count)])
            await asyncio.sleep(self._interval * (1.0 + 0.1 * random.random()))

    async def _check(self, index: int) -> None:
        try:
            error = await self._probe(index)
        except Exception as exc:  # a bug in a probe must not end the checking task
            host, port = self._targets[index]
            log.exception("health check of %s:%d failed unexpectedly", host, port)
            error = f"error: {type(exc).__name__}"
        self._errors[index] = error
        passed = error is None
        if self._states[index].record(passed) and not self._closed:
            try:
                self._on_change(index, passed)
            except Exception:  # the listener's bug must not stop the checks either
                log.exception("health change listener failed for endpoint %d", index)

    async def _probe(self, index: int) -> str | None:
        """One check of endpoint `index`: None when it passed, else a short reason."""
        host, port = self._targets[index]
        tls = self._tls
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self._timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=tls,
                    server_hostname=(self._server_name or host) if tls is not None else None,
                )
                writer.write(self._requests[index])
                line = await reader.readline()
        except TimeoutError:
            return "timeout"
        except ConnectionRefusedError:
            return "connection refused"
        except ConnectionResetError:
            return "connection reset"
        except ssl.SSLError as exc:
            return f"TLS failed: {exc.reason or type(exc).__name__}"
        except OSError as exc:
            return f"connection failed: {exc.strerror or type(exc).__name__}"
        except ValueError:
            # readline() past the reader's limit: no status line is that long
            return "invalid response"
        finally:
            if writer is not None:
                await self._close(writer)
        return _judge(line)

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            async with asyncio.timeout(self._timeout):
                await writer.wait_closed()
        except TimeoutError:
            # a TLS peer that never answers close_notify must not hold up the round
            writer.transport.abort()
        except Exception:
            pass  # the connection's own error, surfacing again: the probe is judged already
