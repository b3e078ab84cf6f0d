"""What a stage kind is: its config class, parser, builder and optional lifecycle, as one record.

Each stage module (`gateway/stages/<kind>.py`) ends with one `StageKind`, and
`gateway/stages/registry.py` lists them by YAML key.  The loader uses a kind's `parse`,
`check`, `upstream_headers` and `answers` (`gateway.config.stages.ConfigKind`); the runtime
its `build` and, when the stage holds something, `retire` (a reload replaced it), `close`
(shutdown), `warm` (before the gateway reports ready) and `upstreams` (its state per upstream
for /admin/upstreams).  Everything here runs once per reload, never per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gateway.config.model import StageSpec
from gateway.config.reader import Reader
from gateway.config.stages import PipelineCheck
from gateway.observability.metrics import GatewayMetrics
from gateway.pipeline import Stage
from gateway.stores.base import Store
from gateway.stores.memory import MemoryStore

C = TypeVar("C")
S = TypeVar("S", bound=Stage)


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What stages are built with: the loop, the metrics, and the stores by name."""

    loop: asyncio.AbstractEventLoop
    metrics: GatewayMetrics
    #: the snapshot's stores by name, "memory" included
    stores: Mapping[str, Store]
    #: the per-worker memory store (local fallback buckets)
    memory: MemoryStore
    #: stores whose settings changed in this snapshot: a stage using one is built afresh even
    #: when its own config is unchanged, so that it holds the new store
    replaced_stores: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True, kw_only=True)
class StageKind(Generic[C, S]):
    """One stage kind: config class `C`, stage class `S`."""

    #: the YAML key
    name: str
    #: the kind's config at a YAML path, or None after reporting its errors
    parse: Callable[[Reader, object, str], C | None]
    #: the stage for one pipeline entry (its owner and label are in the spec)
    build: Callable[[C, StageSpec, BuildContext], S]
    #: a YAML example of the kind's config, shown in docs/adding-a-stage.md and parsed by a test
    example: str
    #: rules between this entry and the rest of its route's pipeline (see PipelineCheck)
    check: Callable[[PipelineCheck, C], C] | None = None
    #: request headers the stage sets for the upstream
    upstream_headers: Callable[[C], Iterable[str]] | None = None
    #: the stage answers every request itself (a redirect): its routes take no `upstream`,
    #: and nothing after it in a pipeline would ever run
    answers: bool = False
    #: settings resolved for the route, shown by /admin/routes
    describe: Callable[[C], dict[str, Any]] | None = None
    #: a reload replaced the stage: release what it holds without failing requests still in it
    retire: Callable[[S], None] | None = None
    #: shutdown: release everything it holds
    close: Callable[[S], None] | None = None
    #: before ready (given a time limit): fetch what the first requests need
    warm: Callable[[S, float], Awaitable[None]] | None = None
    #: its state per upstream name, listed in /admin/upstreams under "<kind>s"
    upstreams: Callable[[S], dict[str, dict[str, Any]]] | None = None
