"""Active health checks: GET the configured path on every endpoint of an upstream, on a timer.

One task per upstream probes all its endpoints at once, then again every `interval` (plus up to
10 % random jitter, so a fleet of gateways does not probe in step).  A probe opens its own
connection — never a pooled one, whose health says nothing about a fresh connect — sends a
minimal request with `Connection: close`, and passes on a 2xx or 3xx status line within
`timeout`.  Results feed a `HealthState` per endpoint; `on_change` hears only real changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Callable, Sequence
from typing import final

from gateway.config.model import HealthCheckConfig
from gateway.core.health import HealthState

log = logging.getLogger("gateway.health")


@final
class HealthChecker:
    __slots__ = (
        "_config",
        "_errors",
        "_loop",
        "_on_change",
        "_request",
        "_server_name",
        "_states",
        "_targets",
        "_task",
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
        #: https endpoints are checked over TLS, verified like requests are
        self._tls = tls
        self._server_name = server_name
        self._config = config
        self._targets = list(targets)
        self._on_change = on_change
        self._states = [HealthState(config) for _ in targets]
        self._errors: list[str | None] = [None] * len(targets)
        self._request = [
            (
                f"GET {config.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "User-Agent: gateway-health-check\r\nConnection: close\r\n\r\n"
            ).encode("latin-1")
            for host, port in targets
        ]
        self._task: asyncio.Task[None] | None = None

    def healthy(self, index: int) -> bool:
        return self._states[index].healthy

    def last_error(self, index: int) -> str | None:
        return self._errors[index]

    def start(self) -> None:
        if self._task is None:
            self._task = self._loop.create_task(self._run())

    def close(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()

    async def _run(self) -> None:
        interval = self._config.interval
        while True:
            await asyncio.gather(*(self._check(i) for i in range(len(self._targets))))
            await asyncio.sleep(interval * (1.0 + 0.1 * random.random()))

    async def _check(self, index: int) -> None:
        try:
            error = await self._probe(index)
        except Exception as exc:  # a probe must never end the checking task
            log.exception("health check of %s:%d failed unexpectedly", *self._targets[index])
            error = f"error: {type(exc).__name__}"
        self._errors[index] = error
        if self._states[index].record(error is None):
            self._on_change(index, error is None)

    async def _probe(self, index: int) -> str | None:
        """None when the endpoint passed, else a short reason."""
        host, port = self._targets[index]
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self._config.timeout):
                if self._tls is None:
                    reader, writer = await asyncio.open_connection(host, port)
                else:
                    reader, writer = await asyncio.open_connection(
                        host, port, ssl=self._tls, server_hostname=self._server_name or host
                    )
                writer.write(self._request[index])
                line = await reader.readline()
        except TimeoutError:
            return "timeout"
        except ConnectionRefusedError:
            return "connection refused"
        except ssl.SSLError as exc:
            return f"TLS failed: {exc.reason or exc}"
        except OSError as exc:
            return f"connection failed: {exc.strerror or type(exc).__name__}"
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            return "invalid response" if line else "connection closed"
        status = int(parts[1])
        return None if 200 <= status < 400 else f"status {status}"
