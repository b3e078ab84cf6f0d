"""State that survives reloads: upstreams (with their warm connection pools) and stages.

A new snapshot asks for each upstream by its config; an unchanged one gets the live object back,
a changed or new one gets a fresh object that becomes live only when the snapshot is committed.
Committing closes what only the old snapshot used: idle connections at once, busy ones as their
exchanges end, so requests in flight finish on the pools they started with.

Stages are kept the same way, keyed by their owner (a named middleware, or a route's position)
and kind: an unchanged stage config gets the live instance back, with its state (buckets,
breaker), and a changed one starts afresh.
"""

from __future__ import annotations

import asyncio
from typing import final

from gateway.config.model import StageSpec, UpstreamConfig
from gateway.observability.metrics import GatewayMetrics
from gateway.pipeline import Stage
from gateway.stages import build_stage
from gateway.upstream.upstream import Upstream

StageKey = tuple[str, str]


@final
class SharedState:
    __slots__ = ("_live", "_live_stages", "loop", "metrics")

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: GatewayMetrics) -> None:
        self.loop = loop
        self.metrics = metrics
        self._live: dict[str, Upstream] = {}
        self._live_stages: dict[StageKey, tuple[StageSpec, Stage]] = {}

    def upstream(self, config: UpstreamConfig) -> Upstream:
        live = self._live.get(config.name)
        if live is not None and live.config == config:
            return live
        return Upstream(config, self.loop, self.metrics)

    def stage(self, spec: StageSpec, built: dict[StageKey, tuple[StageSpec, Stage]]) -> Stage:
        """The stage for `spec`: the live one when its config is unchanged, else a new one.

        `built` collects the snapshot's stages, so a named middleware used by several routes is
        one instance; it becomes the live set on `commit`.
        """
        key = (spec.owner, spec.kind)
        entry = built.get(key)
        if entry is None:
            live = self._live_stages.get(key)
            entry = live if live is not None and live[0] == spec else (spec, build_stage(spec))
            built[key] = entry
        return entry[1]

    def commit(
        self,
        upstreams: dict[str, Upstream],
        stages: dict[StageKey, tuple[StageSpec, Stage]] | None = None,
    ) -> None:
        """Make `upstreams` and `stages` live; close every previously live upstream not kept."""
        if stages is not None:
            self._live_stages = dict(stages)
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
