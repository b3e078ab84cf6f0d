"""Read a running gateway's /metrics the way Prometheus does: over the admin port, parsed by
prometheus_client's own parser, one value per (sample name, labels)."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway

#: (sample name, its labels sorted) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(gateway: Gateway) -> Samples:
    """Every sample /metrics shows now."""
    assert gateway.admin is not None
    url = f"http://127.0.0.1:{gateway.admin.port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        text = await response.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a KeyError names the sample when /metrics does not show it."""
    return samples[(name, tuple(sorted(labels.items())))]


def labelled(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called `name`, by its labels."""
    return {labels: v for (n, labels), v in samples.items() if n == name}


def whole_milliseconds(seconds: float) -> bool:
    """Whether `seconds` is a whole number of milliseconds (within float error): all a clock
    that ticks in milliseconds can measure, whatever it adds up."""
    ms = seconds * 1000
    return abs(ms - round(ms)) < 1e-6
