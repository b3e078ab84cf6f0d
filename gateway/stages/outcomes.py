"""gateway_stage_total{route,stage,outcome} (SPEC §5.8) for one stage kind: what the operator
stages count their decisions in, the counter children kept per route and outcome so that a
decision costs two dict lookups and an increment (a named middleware counts under each route
that runs it)."""

from __future__ import annotations

from typing import final

from gateway.observability.instruments import Counter, CounterChild


@final
class StageOutcomes:
    """gateway_stage_total{route,stage,outcome} for one stage kind, its children kept per route
    and outcome (a named middleware counts under each route that runs it)."""

    __slots__ = ("_by_route", "_kind", "_total")

    def __init__(self, total: Counter, kind: str) -> None:
        self._total = total
        self._kind = kind
        self._by_route: dict[str, dict[str, CounterChild]] = {}

    def count(self, route: str, outcome: str) -> None:
        by_outcome = self._by_route.get(route)
        if by_outcome is None:
            by_outcome = self._by_route[route] = {}
        child = by_outcome.get(outcome)
        if child is None:
            child = by_outcome[outcome] = self._total.labels(route, self._kind, outcome)
        child.inc()
