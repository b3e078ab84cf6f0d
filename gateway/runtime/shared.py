"""State that survives reloads: upstreams (with their warm connection pools) and stages.

A new snapshot asks for each upstream by its config; an unchanged one gets the live object back,
a changed or new one gets a fresh object that becomes live only when the snapshot is committed.
Committing retires the upstreams only the old snapshot used: requests that began on it (and
their retries) still finish on their pools, which keep no idle connection and close each busy
one as its exchange ends.  A retired upstream is held in `retiring` until it holds no
connection; shutdown closes whatever is still there.

Stages are kept the same way, keyed by their owner (a named middleware, or a route's position)
and kind: an unchanged stage config gets the live instance back, with its state (buckets,
breaker), and a changed one starts afresh.  A replaced stage is retired, not closed: requests of
the old snapshot may still be running through it (waiting for a JWKS fetch, say).

Shared stores (`stores:`) are kept the same way: an unchanged store keeps its client and its
connections; a changed one is a new client, every stage naming it is built afresh to hold it, and
the old one is closed `STORE_GRACE` seconds after the commit, when the requests that began on the
old snapshot are done with it.

The tracer (spans' export thread and its queue) is kept while the `tracing:` section is
unchanged; a replaced one is closed after `TRACER_GRACE` seconds, once the requests that began
on the old snapshot have ended their spans, on a thread (closing exports what is queued).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from typing import final

from gateway.config.model import StageSpec, StoreConfig, TracingConfig, UpstreamConfig
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.tracing import Tracer
from gateway.pipeline import Stage
from gateway.stages.kind import BuildContext
from gateway.stages.registry import KINDS
from gateway.stores.base import Store
from gateway.stores.memory import MemoryStore
from gateway.stores.redis import RedisStore, StoreMeter
from gateway.upstream.upstream import Upstream

StageKey = tuple[str, str]

log = logging.getLogger("gateway.upstream")

#: how long a replaced tracer keeps exporting the spans of requests that began before a reload
TRACER_GRACE = 60.0
#: how long a replaced store stays open for the requests that began before a reload
STORE_GRACE = 60.0


@final
class SharedState:
    __slots__ = (
        "_live",
        "_live_stages",
        "_live_stores",
        "_live_tracer",
        "_retired_stores",
        "_retired_tracers",
        "_retiring",
        "loop",
        "memory",
        "metrics",
        "version",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: GatewayMetrics) -> None:
        self.loop = loop
        self.metrics = metrics
        self._live: dict[str, Upstream] = {}
        self._live_stages: dict[StageKey, tuple[StageSpec, Stage]] = {}
        #: retired upstreams whose pools still hold connections
        self._retiring: set[Upstream] = set()
        #: "memory" always exists (per worker); the named shared stores by name
        self.memory = MemoryStore(clock=loop.time)
        self._live_stores: dict[str, RedisStore] = {}
        #: replaced stores not closed yet (closed after STORE_GRACE, or at shutdown)
        self._retired_stores: set[RedisStore] = set()
        self._live_tracer: Tracer | None = None
        #: replaced tracers not closed yet (closed after TRACER_GRACE, or at shutdown)
        self._retired_tracers: set[Tracer] = set()
        #: the gateway's version, a resource attribute of its spans
        self.version = ""

    def tracer(self, config: TracingConfig | None) -> Tracer | None:
        """The tracer for a `tracing:` section: the live one when it is unchanged."""
        if config is None:
            return None
        live = self._live_tracer
        if live is not None and live.config == config:
            return live
        return Tracer(config, self.metrics, self.loop, self.version)

    def upstream(self, config: UpstreamConfig) -> Upstream:
        live = self._live.get(config.name)
        if live is not None and live.config == config:
            return live
        return Upstream(config, self.loop, self.metrics)

    def build_context(self, configs: tuple[StoreConfig, ...]) -> BuildContext:
        """What a snapshot's stages are built with: its stores — the live ones whose settings
        are unchanged, new ones (not connected yet) for the others."""
        stores: dict[str, Store] = {"memory": self.memory}
        replaced = set(self._live_stores)
        for config in configs:
            live = self._live_stores.get(config.name)
            if live is not None and live.config == config:
                stores[config.name] = live
                replaced.discard(config.name)
            else:
                meter = StoreMeter(self.metrics, config.name)
                stores[config.name] = RedisStore.from_config(config, meter)
        return BuildContext(self.loop, self.metrics, stores, self.memory, frozenset(replaced))

    def stage(
        self,
        spec: StageSpec,
        built: dict[StageKey, tuple[StageSpec, Stage]],
        env: BuildContext,
    ) -> Stage:
        """The stage for `spec`: the live one when its config and its store are unchanged,
        else a new one.

        `built` collects the snapshot's stages, so a named middleware used by several routes is
        one instance; it becomes the live set on `commit`.
        """
        key = (spec.owner, spec.kind)
        entry = built.get(key)
        if entry is None:
            live = self._live_stages.get(key)
            reuse = (
                live is not None
                and live[0] == spec
                and getattr(spec.config, "store", None) not in env.replaced_stores
            )
            entry = (
                live
                if reuse and live is not None
                else (spec, KINDS[spec.kind].build(spec.config, spec, env))
            )
            built[key] = entry
        return entry[1]

    def commit(
        self,
        upstreams: dict[str, Upstream],
        stages: dict[StageKey, tuple[StageSpec, Stage]] | None = None,
        tracer: Tracer | None = None,
        stores: Mapping[str, Store] | None = None,
    ) -> None:
        """Make `upstreams`, `stages`, `tracer` and `stores` live; retire every previously
        live one not kept."""
        if stores is not None:
            shared = {n: s for n, s in stores.items() if isinstance(s, RedisStore)}
            kept = {id(s) for s in shared.values()}
            for old_store in self._live_stores.values():
                if id(old_store) not in kept:
                    self._retire_store(old_store)
            self._live_stores = shared
        old_tracer = self._live_tracer
        if old_tracer is not None and old_tracer is not tracer:
            self._retire_tracer(old_tracer)
        self._live_tracer = tracer
        if stages is not None:
            kept = {id(stage) for _, stage in stages.values()}
            for old_spec, old_stage in self._live_stages.values():
                retire = KINDS[old_spec.kind].retire
                if id(old_stage) not in kept and retire is not None:
                    retire(old_stage)
            self._live_stages = dict(stages)
        keep = {id(u) for u in upstreams.values()}
        addresses = {(u.name, e.address) for u in upstreams.values() for e in u.endpoints}
        for old in self._live.values():
            if id(old) not in keep:
                self._retiring.add(old)
                old.retire(self._drained)
                for endpoint in old.endpoints:
                    if (old.name, endpoint.address) not in addresses:
                        self.metrics.upstream_endpoint_up.remove(old.name, endpoint.address)
        self._live = dict(upstreams)
        for upstream in upstreams.values():
            upstream.start()

    @property
    def retiring(self) -> tuple[Upstream, ...]:
        """Upstreams a reload retired whose pools still hold connections."""
        return tuple(self._retiring)

    def _drained(self, upstream: Upstream) -> None:
        # may be called again if a late request opened one more connection: discard, not remove
        if upstream in self._retiring:
            self._retiring.discard(upstream)
            log.debug("retired upstream %s closed its last connection", upstream.name)

    def _retire_tracer(self, tracer: Tracer) -> None:
        self._retired_tracers.add(tracer)

        def close() -> None:
            if tracer in self._retired_tracers:
                self._retired_tracers.discard(tracer)
                # its last export may wait for the collector: off the loop, on a thread that
                # ends with it (gateway.runtime.threads)
                threading.Thread(target=tracer.close, name="tracer-close", daemon=True).start()

        self.loop.call_later(TRACER_GRACE, close)

    def _retire_store(self, store: RedisStore) -> None:
        self._retired_stores.add(store)

        def close() -> None:
            if store in self._retired_stores:
                self._retired_stores.discard(store)
                self.loop.create_task(store.aclose())

        self.loop.call_later(STORE_GRACE, close)

    @property
    def live_stores(self) -> dict[str, RedisStore]:
        return dict(self._live_stores)

    async def close_stores(self) -> None:
        """Close every store's connections (shutdown)."""
        stores = [*self._live_stores.values(), *self._retired_stores]
        self._live_stores = {}
        self._retired_stores = set()
        for store in stores:
            try:
                await store.aclose()
            except Exception as exc:  # closing is best effort: the process is ending
                log.warning("closing store %s failed: %s", store.name, exc)

    def discard(self, upstreams: dict[str, Upstream], tracer: Tracer | None = None) -> None:
        """A snapshot that was never committed: close what it created."""
        live = {id(u) for u in self._live.values()}
        for upstream in upstreams.values():
            if id(upstream) not in live:
                upstream.close()
        if tracer is not None and tracer is not self._live_tracer:
            tracer.close()  # nothing was queued on it: quick
        # stages it built are simply dropped: nothing of theirs is running yet

    def close(self) -> None:
        for upstream in (*self._live.values(), *self._retiring):
            upstream.close()
        self._live = {}
        self._retiring = set()
        for spec, stage in self._live_stages.values():
            close = KINDS[spec.kind].close
            if close is not None:
                close(stage)
        self._live_stages = {}

    def close_tracers(self) -> None:
        """Export what the tracers hold and stop their threads: blocks up to the exporters'
        timeouts, so the gateway calls it on a thread at shutdown."""
        tracers = [*self._retired_tracers]
        if self._live_tracer is not None:
            tracers.append(self._live_tracer)
        self._retired_tracers = set()
        self._live_tracer = None
        for tracer in tracers:
            tracer.close()
