"""Pipeline stages, one module per YAML key, and the terminal handlers (proxy, echo).

`build_stage` turns a stage's config into its stage object; it is called once per stage per
snapshot (and not even that when `SharedState` hands back the live instance of an unchanged
stage), never per request.
"""

from __future__ import annotations

from gateway.config.model import HeadersConfig, StageSpec
from gateway.pipeline import Stage
from gateway.stages.headers import HeadersStage


def build_stage(spec: StageSpec) -> Stage:
    config = spec.config
    if isinstance(config, HeadersConfig):
        return HeadersStage(config)
    raise AssertionError(f"no builder for stage kind {spec.kind!r}")  # the loader refuses it
