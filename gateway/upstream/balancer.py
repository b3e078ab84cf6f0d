"""Endpoint selection: weighted round robin and least request.

Both are O(1) per pick.  Round robin walks a schedule computed once at build time with the
"smooth weighted round robin" interleaving (weights 5,1,1 give a a b a c a a, not a a a a a b c).
Least request compares two distinct endpoints drawn at random by weight ("power of two
choices") and takes the one with fewer requests in flight per unit of weight.  The second draw is
made among the others: drawn with replacement, two endpoints would compare one with itself half
the time, and that pick goes to it however loaded it is (issue 12, defect 7).
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
    __slots__ = ("_cumulative", "_random", "_total", "_weights")

    def __init__(self, weights: Sequence[int], rng: random.Random | None = None) -> None:
        total = 0
        cumulative: list[int] = []
        for w in weights:
            total += w
            cumulative.append(total)
        self._weights = list(weights)
        self._cumulative = cumulative
        self._total = total
        # a seeded one in tests; otherwise seeded from the OS, so workers do not draw in step
        self._random = rng if rng is not None else random.Random()

    def candidates(self) -> tuple[int, int]:
        """Two distinct indices, each drawn by weight: the first among all endpoints, the
        second among the others (at least two endpoints)."""
        cumulative = self._cumulative
        rng = self._random
        a = bisect_right(cumulative, rng.randrange(self._total))
        if len(cumulative) == 2:
            return a, 1 - a  # the other one is the only choice: no second draw
        # draw in [0, total - weight_a) and skip a's interval [start_a, cumulative[a]): the
        # others' weights, laid end to end, without building a list per pick
        weight_a = self._weights[a]
        r = rng.randrange(self._total - weight_a)
        if r >= cumulative[a] - weight_a:
            r += weight_a
        return a, bisect_right(cumulative, r)

    def pick(self, endpoints: Sequence[Weighted]) -> int:
        if len(endpoints) == 1:
            return 0
        a, b = self.candidates()
        ea, eb = endpoints[a], endpoints[b]
        # fewer in flight per unit of weight wins (a, drawn first by weight, on a tie); compare
        # by cross-multiplying to stay in ints
        return a if ea.in_flight * eb.weight <= eb.in_flight * ea.weight else b
