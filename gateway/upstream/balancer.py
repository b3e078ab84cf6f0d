"""Endpoint selection: weighted round robin and least request.

Both are O(1) per pick.  Round robin walks a schedule computed once at build time with the
"smooth weighted round robin" interleaving (weights 5,1,1 give a a b a c a a, not a a a a a b c).
Least request compares two endpoints drawn at random by weight ("power of two choices") and
takes the one with fewer requests in flight per unit of weight.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from math import gcd
from typing import Protocol, final


class Weighted(Protocol):
    weight: int
    in_flight: int


def smooth_schedule(weights: Sequence[int]) -> list[int]:
    """The order of indices one full weighted round takes."""
    total = sum(weights)
    current = [0] * len(weights)
    order: list[int] = []
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=lambda i: current[i])
        current[best] -= total
        order.append(best)
    return order


@final
class RoundRobin:
    __slots__ = ("_i", "_schedule")

    def __init__(self, weights: Sequence[int]) -> None:
        # very large weights would make a huge schedule: reduce by their common divisor first
        g = 0
        for w in weights:
            g = gcd(g, w)
        self._schedule = smooth_schedule([w // (g or 1) for w in weights])
        self._i = random.randrange(len(self._schedule))  # workers should not all start in step

    def pick(self, endpoints: Sequence[Weighted]) -> int:
        self._i += 1
        if self._i >= len(self._schedule):
            self._i = 0
        return self._schedule[self._i]


@final
class LeastRequest:
    __slots__ = ("_cumulative", "_total")

    def __init__(self, weights: Sequence[int]) -> None:
        total = 0
        cumulative: list[int] = []
        for w in weights:
            total += w
            cumulative.append(total)
        self._cumulative = cumulative
        self._total = total

    def _draw(self) -> int:
        return bisect_right(self._cumulative, random.randrange(self._total))

    def pick(self, endpoints: Sequence[Weighted]) -> int:
        if len(endpoints) == 1:
            return 0
        a = self._draw()
        b = self._draw()
        ea, eb = endpoints[a], endpoints[b]
        # fewer in flight per unit of weight wins; compare by cross-multiplying to stay in ints
        return a if ea.in_flight * eb.weight <= eb.in_flight * ea.weight else b
