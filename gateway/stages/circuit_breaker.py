"""The `circuit_breaker` stage (SPEC §5.4): stop sending to an upstream that keeps failing.

One `Breaker` (core/breaker.py: the state machine, pure) per upstream the stage's routes send
to, so a weighted split keeps one circuit per side: the one the route drew for the request
(`ctx.target`), which the proxy and any retry use too.

A failure is an upstream failure (connect error, reset, timeout), a response or gateway error
whose status is in `failure_statuses`, a response whose body was cut short (a streamed
response is judged when its body ends, through its `Completion`), or — with `slow_call` — a
response head slower than its duration.  Anything else that ends the request early (a later
stage's 429, a client's body that never came, no pooled connection free in time — local
congestion, which slow clients can cause and which must not open the circuit for everyone) is
neither success nor failure: its ticket is released, so a half-open probe slot is not lost.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any, Final, final

from gateway.config.model import INTERNAL_ECHO, StageSpec
from gateway.config.reader import (
    Fields,
    Nested,
    Reader,
    as_str,
    positive_duration,
    positive_int,
    status,
)
from gateway.core.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from gateway.errors import CircuitOpen, GatewayError
from gateway.http.messages import Response
from gateway.observability.metrics import GatewayMetrics
from gateway.pipeline import Next, RequestContext
from gateway.stages.converters import OWNED_RESPONSE, header_values, share, statuses
from gateway.stages.kind import BuildContext, StageKind


@dataclass(frozen=True, slots=True, kw_only=True)
class SlowCallConfig:
    duration: float
    ratio: float


@dataclass(frozen=True, slots=True, kw_only=True)
class FallbackConfig:
    """The response a circuit breaker gives while open, instead of 503 circuit_open."""

    status: int = 503
    body: str = ""
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitBreakerConfig:
    window: float = 10.0
    min_requests: int = 20
    failure_ratio: float = 0.5
    failure_statuses: tuple[int, ...] = (502, 503, 504)
    slow_call: SlowCallConfig | None = None
    open_for: float = 5.0
    max_open_for: float = 60.0
    half_open_requests: int = 3
    fallback: FallbackConfig | None = None


EXAMPLE: Final = """\
window: 30s
min_requests: 20
failure_ratio: 0.5
slow_call: {duration: 2s, ratio: 0.8}
open_for: 5s
fallback: {status: 503, body: '{"error": "try later"}', headers: {Content-Type: application/json}}
"""


def _fallback_headers(r: Reader, raw: object, path: str) -> tuple[tuple[str, str], ...]:
    return header_values(r, raw, path, OWNED_RESPONSE)


def _check_open_for(r: Reader, config: CircuitBreakerConfig, path: str) -> None:
    if config.max_open_for < config.open_for:
        r.error(f"{path}.max_open_for", "must be at least open_for")


_SLOW_CALL: Final = Fields(
    SlowCallConfig,
    {"duration": positive_duration, "ratio": share},
    required=("duration", "ratio"),
)
_FALLBACK: Final = Fields(
    FallbackConfig, {"status": status, "body": as_str, "headers": Nested(_fallback_headers)}
)
_FIELDS: Final = Fields(
    CircuitBreakerConfig,
    {
        "window": positive_duration,
        "min_requests": positive_int,
        "failure_ratio": share,
        "failure_statuses": statuses,
        "slow_call": Nested(_SLOW_CALL.parse),
        "open_for": positive_duration,
        "max_open_for": positive_duration,
        "half_open_requests": positive_int,
        "fallback": Nested(_FALLBACK.parse),
    },
    check=_check_open_for,
)

_STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}


@final
class _Circuit:
    """One upstream's breaker with its metrics children resolved."""

    __slots__ = ("breaker", "upstream")

    def __init__(
        self,
        config: CircuitBreakerConfig,
        name: str,
        upstream: str,
        metrics: GatewayMetrics,
        now: float,
    ) -> None:
        self.upstream = upstream
        self.breaker = Breaker(config, now)
        gauge = metrics.circuit_breaker_state.labels(name, upstream)
        gauge.set(CLOSED)
        transitions = metrics.circuit_breaker_transitions_total

        def on_transition(before: int, after: int) -> None:
            gauge.set(after)
            transitions.labels(name, upstream, _STATE_NAMES[after]).inc()

        self.breaker.on_transition = on_transition


@final
class CircuitBreakerStage:
    __slots__ = (
        "_circuits",
        "_config",
        "_failure_statuses",
        "_fallback",
        "_loop",
        "_metrics",
        "_name",
    )

    def __init__(
        self,
        config: CircuitBreakerConfig,
        name: str,
        metrics: GatewayMetrics,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._config = config
        self._name = name
        self._metrics = metrics
        self._loop = loop
        self._failure_statuses = frozenset(config.failure_statuses)
        self._circuits: dict[str, _Circuit] = {}
        fallback = config.fallback
        self._fallback = (
            None
            if fallback is None
            else (
                fallback.status,
                [(n.encode("latin-1"), v.encode("latin-1")) for n, v in fallback.headers],
                fallback.body.encode("utf-8"),
            )
        )

    def _circuit(self, upstream: str) -> _Circuit:
        circuit = self._circuits.get(upstream)
        if circuit is None:
            circuit = self._circuits[upstream] = _Circuit(
                self._config, self._name, upstream, self._metrics, self._loop.time()
            )
        return circuit

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Response:
        target = ctx.target
        chosen = INTERNAL_ECHO if target is None else target.name
        breaker = self._circuit(chosen).breaker
        loop = self._loop
        started = loop.time()
        ticket = breaker.allow(started)
        if ticket < 0:
            ctx.outcome("circuit_breaker", "open")
            return self._refuse(breaker.retry_after(started))
        try:
            response = await call_next(ctx)
        except GatewayError as exc:
            if exc.failure == "overflow":
                breaker.release(ticket)
            elif exc.failure or exc.status in self._failure_statuses:
                breaker.record(ticket, loop.time(), failure=True, duration=loop.time() - started)
            else:
                breaker.release(ticket)
            raise
        except BaseException:
            breaker.release(ticket)
            raise
        now = loop.time()
        failure = response.status in self._failure_statuses
        completion = response.completion
        if completion is None:
            breaker.record(ticket, now, failure=failure, duration=now - started)
        else:
            # judged when the body ends: a body cut short is a failure (issue 12)
            completion.add(_BodyOutcome(breaker, ticket, failure, now - started, loop))
        return response

    def _refuse(self, retry_after: float) -> Response:
        seconds = str(max(1, math.ceil(retry_after)))
        fallback = self._fallback
        if fallback is None:
            raise CircuitOpen(
                "the upstream is failing; requests are paused",
                headers=(("Retry-After", seconds),),
            )
        status, headers, body = fallback
        return Response(status, [*headers, (b"Retry-After", seconds.encode("ascii"))], body)

    def describe(self) -> dict[str, dict[str, Any]]:
        """Each upstream's circuit, for /admin/upstreams."""
        now = self._loop.time()
        return {name: c.breaker.describe(now) for name, c in self._circuits.items()}

    @property
    def name(self) -> str:
        return self._name


@final
class _BodyOutcome:
    """Records a streamed exchange with the breaker once its body has ended: the head's status
    and duration (slow calls are about the head), failed as well if the body was cut short, and
    nothing — the probe ticket released — if the client abandoned it."""

    __slots__ = ("_breaker", "_duration", "_failure", "_loop", "_ticket")

    def __init__(
        self,
        breaker: Breaker,
        ticket: int,
        failure: bool,
        duration: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._breaker = breaker
        self._ticket = ticket
        self._failure = failure
        self._duration = duration
        self._loop = loop

    def __call__(self, outcome: bool | None) -> None:
        if outcome is None:
            self._breaker.release(self._ticket)
        else:
            self._breaker.record(
                self._ticket,
                self._loop.time(),
                failure=self._failure or not outcome,
                duration=self._duration,
            )


def build(config: CircuitBreakerConfig, spec: StageSpec, env: BuildContext) -> CircuitBreakerStage:
    return CircuitBreakerStage(config, spec.label, env.metrics, env.loop)


KIND: Final[StageKind[CircuitBreakerConfig, CircuitBreakerStage]] = StageKind(
    name="circuit_breaker",
    parse=_FIELDS.parse,
    build=build,
    example=EXAMPLE,
    upstreams=CircuitBreakerStage.describe,
)
