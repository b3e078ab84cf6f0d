"""Pipeline stages, one module per YAML key, and the terminal handlers (proxy, echo).

`build_stage` turns a stage's config into its stage object; it is called once per stage per
snapshot (and not even that when `SharedState` hands back the live instance of an unchanged
stage), never per request.  Which store a stage uses (memory or, later, Redis) is decided here
too, never per request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gateway.config.model import (
    CircuitBreakerConfig,
    HeadersConfig,
    IdempotencyConfig,
    JwtConfig,
    MtlsConfig,
    RateLimitConfig,
    RetryConfig,
    StageSpec,
)
from gateway.observability.metrics import GatewayMetrics
from gateway.pipeline import Stage
from gateway.stages.circuit_breaker import CircuitBreakerStage
from gateway.stages.headers import HeadersStage
from gateway.stages.idempotency import IdempotencyStage
from gateway.stages.jwt import JwtStage
from gateway.stages.mtls import MtlsStage
from gateway.stages.rate_limit import RateLimitStage
from gateway.stages.retry import RetryStage
from gateway.stores.base import Store


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What stages are built with: the loop, the metrics, and the stores by name."""

    loop: asyncio.AbstractEventLoop
    metrics: GatewayMetrics
    stores: dict[str, Store]


def build_stage(spec: StageSpec, env: BuildContext) -> Stage:
    config = spec.config
    if isinstance(config, HeadersConfig):
        return HeadersStage(config)
    if isinstance(config, IdempotencyConfig):
        return IdempotencyStage(
            config, spec.label, spec.owner, env.stores[config.store], env.metrics, env.loop
        )
    if isinstance(config, JwtConfig):
        metrics = env.metrics
        return JwtStage(config, metrics.jwt_total, metrics.jwt_keys_skipped_total, env.loop)
    if isinstance(config, MtlsConfig):
        return MtlsStage(config)
    if isinstance(config, RateLimitConfig):
        return RateLimitStage(
            config,
            spec.label,
            spec.owner,
            env.stores[config.store],
            env.stores["memory"],
            env.metrics,
        )
    if isinstance(config, CircuitBreakerConfig):
        return CircuitBreakerStage(config, spec.label, env.metrics, env.loop)
    if isinstance(config, RetryConfig):
        return RetryStage(config, env.metrics.retries_total, env.loop)
    raise AssertionError(f"no builder for stage kind {spec.kind!r}")  # the loader refuses it


def retire_stage(stage: Stage) -> None:
    """A reload replaced `stage`: release what it holds (buckets, a JWKS refresh task) without
    failing the requests that began on the old snapshot and still run through it."""
    if isinstance(stage, JwtStage):
        stage.retire()
    elif isinstance(stage, RateLimitStage):
        stage.close()  # a request still here starts a fresh bucket: never refused for it


def close_stage(stage: Stage) -> None:
    """At shutdown: release everything a stage holds."""
    if isinstance(stage, RateLimitStage | JwtStage):
        stage.close()
