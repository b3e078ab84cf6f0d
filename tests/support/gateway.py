"""Run the gateway in-process on a config written to a temporary directory."""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

from gateway.app import Gateway


def write_config(directory: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


@contextlib.asynccontextmanager
async def running_gateway(directory: Path, text: str) -> AsyncIterator[Gateway]:
    """Start a gateway on `text` (use port 0 for listeners and admin); drain it afterwards."""
    path = write_config(directory, text)
    gateway = Gateway(str(path))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()
        # let connection_lost callbacks of closed transports run
        await asyncio.sleep(0)


def in_flight_requests(gateway: Gateway) -> float:
    """The gateway's own count of requests being handled."""
    return float(gateway.metrics.requests_in_flight.labels().value)


def port_of(gateway: Gateway, listener: str = "http") -> int:
    return gateway.bound[listener][1]
