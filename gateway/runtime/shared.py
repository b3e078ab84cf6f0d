"""State that survives reloads: upstreams (with their warm connection pools).

A new snapshot asks for each upstream by its config; an unchanged one gets the live object back,
a changed or new one gets a fresh object that becomes live only when the snapshot is committed.
Committing closes what only the old snapshot used: idle connections at once, busy ones as their
exchanges end, so requests in flight finish on the pools they started with.
"""

from __future__ import annotations

import asyncio
from typing import final

from gateway.config.model import UpstreamConfig
from gateway.observability.metrics import GatewayMetrics
from gateway.upstream.upstream import Upstream


@final
class SharedState:
    __slots__ = ("_live", "loop", "metrics")

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: GatewayMetrics) -> None:
        self.loop = loop
        self.metrics = metrics
        self._live: dict[str, Upstream] = {}

    def upstream(self, config: UpstreamConfig) -> Upstream:
        live = self._live.get(config.name)
        if live is not None and live.config == config:
            return live
        return Upstream(config, self.loop, self.metrics)

    def commit(self, upstreams: dict[str, Upstream]) -> None:
        """Make `upstreams` the live set; close every previously live one not in it."""
        keep = {id(u) for u in upstreams.values()}
        for old in self._live.values():
            if id(old) not in keep:
                old.close()
        self._live = dict(upstreams)

    def discard(self, upstreams: dict[str, Upstream]) -> None:
        """A snapshot that was never committed: close what it created."""
        live = {id(u) for u in self._live.values()}
        for upstream in upstreams.values():
            if id(upstream) not in live:
                upstream.close()

    def close(self) -> None:
        for upstream in self._live.values():
            upstream.close()
        self._live = {}
