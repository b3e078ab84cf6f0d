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

    __slots__ = ("_by_route", "_kind", "_last_child", "_last_outcome", "_last_route", "_total")

    def __init__(self, total: Counter, kind: str) -> None:
        self._total = total
        self._kind = kind
        self._by_route: dict[str, dict[str, CounterChild]] = {}
        #: the child of the last (route, outcome) counted, by the very strings (a route's
        #: name, an outcome constant): most decisions repeat the one before, and two pointer
        #: compares cost less than two dict lookups
        self._last_route = ""
        self._last_outcome = ""
        self._last_child: CounterChild | None = None

    def count(self, route: str, outcome: str) -> None:
        child = self._last_child
        if child is None or route is not self._last_route or outcome is not self._last_outcome:
            child = self._child(route, outcome)
            self._last_route = route
            self._last_outcome = outcome
            self._last_child = child
        child.inc()

    def _child(self, route: str, outcome: str) -> CounterChild:
        by_outcome = self._by_route.get(route)
        if by_outcome is None:
            by_outcome = self._by_route[route] = {}
        child = by_outcome.get(outcome)
        if child is None:
            child = by_outcome[outcome] = self._total.labels(route, self._kind, outcome)
        return child
