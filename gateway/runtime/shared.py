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
from gateway.stages import BuildContext, build_stage, close_stage
from gateway.stores.base import Store
from gateway.stores.memory import MemoryStore
from gateway.upstream.upstream import Upstream

StageKey = tuple[str, str]


@final
class SharedState:
    __slots__ = ("_env", "_live", "_live_stages", "loop", "metrics", "stores")

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: GatewayMetrics) -> None:
        self.loop = loop
        self.metrics = metrics
        self._live: dict[str, Upstream] = {}
        self._live_stages: dict[StageKey, tuple[StageSpec, Stage]] = {}
        #: "memory" always exists (per worker); named shared stores join it later
        self.stores: dict[str, Store] = {"memory": MemoryStore(clock=loop.time)}
        self._env = BuildContext(loop, metrics, self.stores)

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
            entry = (
                live
                if live is not None and live[0] == spec
                else (spec, build_stage(spec, self._env))
            )
            built[key] = entry
        return entry[1]

    def commit(
        self,
        upstreams: dict[str, Upstream],
        stages: dict[StageKey, tuple[StageSpec, Stage]] | None = None,
    ) -> None:
        """Make `upstreams` and `stages` live; close every previously live one not kept."""
        if stages is not None:
            kept = {id(stage) for _, stage in stages.values()}
            for _, old_stage in self._live_stages.values():
                if id(old_stage) not in kept:
                    close_stage(old_stage)
            self._live_stages = dict(stages)
        keep = {id(u) for u in upstreams.values()}
        addresses = {(u.name, e.address) for u in upstreams.values() for e in u.endpoints}
        for old in self._live.values():
            if id(old) not in keep:
                old.close()
                for endpoint in old.endpoints:
                    if (old.name, endpoint.address) not in addresses:
                        self.metrics.upstream_endpoint_up.remove(old.name, endpoint.address)
        self._live = dict(upstreams)
        for upstream in upstreams.values():
            upstream.start()

    def discard(self, upstreams: dict[str, Upstream]) -> None:
        """A snapshot that was never committed: close what it created."""
        live = {id(u) for u in self._live.values()}
        for upstream in upstreams.values():
            if id(upstream) not in live:
                upstream.close()
        # stages it built are simply dropped: nothing of theirs is running yet

    def close(self) -> None:
        for upstream in self._live.values():
            upstream.close()
        self._live = {}
        for _, stage in self._live_stages.values():
            close_stage(stage)
        self._live_stages = {}
