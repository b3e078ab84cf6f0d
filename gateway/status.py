"""The status listener (SPEC §8): /healthz, /readyz and /metrics on an address of their own,
for Kubernetes probes and a Prometheus in another container.

It serves the admin listener's very handlers (gateway/probes.py) and nothing else: every other
path is a 404, `/admin/*` included whatever Authorization it carries, so exposing this port
never exposes the admin API.  It needs no token: what it shows is what a scraper may see.
"""

from __future__ import annotations

from aiohttp import web

from gateway.probes import ProbeBackend, probe_app


def build_status_app(backend: ProbeBackend) -> web.Application:
    return probe_app("status", backend)
