"""What the admin and the status listener both serve (SPEC §8): /healthz, /readyz, /metrics,
and the problem+json answer each gives for a path or method it does not serve.

Both listeners answer these from the same handlers over the same backend, so a probe or a
scraper moved from the admin port to the status port sees exactly the same thing.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Protocol

from aiohttp import web

from gateway.observability.exposition import (
    OPENMETRICS_CONTENT_TYPE,
    PROMETHEUS_CONTENT_TYPE,
    wants_openmetrics,
)


class ProbeBackend(Protocol):
    @property
    def state(self) -> str: ...
    def stores_info(self) -> list[dict[str, Any]]: ...
    def metrics_text(self, openmetrics: bool = False) -> str: ...


_PROBED = web.AppKey("probed", ProbeBackend)
#: "admin" or "status": which listener a 404 names
_LISTENER = web.AppKey("listener", str)


def problem(status: int, code: str, title: str, detail: str, **headers: str) -> web.Response:
    body = {
        "type": f"urn:gateway:problem:{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "request_id": uuid.uuid4().hex,
    }
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/problem+json",
        headers=headers,
    )


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(data, indent=2).encode(), content_type="application/json"
    )


@web.middleware
async def problems(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own 404 and 405 pages as problem+json, like every other error here."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        allow = ", ".join(sorted(exc.allowed_methods))
        return problem(
            405, "method_not_allowed", "Method Not Allowed", f"allowed: {allow}", Allow=allow
        )
    except web.HTTPNotFound:
        listener = request.app[_LISTENER]
        return problem(404, "no_route", "Not Found", f"no {listener} endpoint at {request.path}")
    return response


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _readyz(request: web.Request) -> web.Response:
    backend = request.app[_PROBED]
    state = backend.state
    # a shared store that is down does not make the gateway unready: its stages answer per
    # on_store_error, and taking every replica out of rotation at once would be an outage
    stores = {store["name"]: store["state"] for store in backend.stores_info()}
    body: dict[str, Any] = {"state": state}
    if stores:
        body["stores"] = stores
    return json_response(body, 200 if state == "ready" else 503)


async def _metrics(request: web.Request) -> web.Response:
    # the format is the scraper's choice: Prometheus asks for OpenMetrics first by default
    openmetrics = wants_openmetrics(",".join(request.headers.getall("Accept", [])))
    text = request.app[_PROBED].metrics_text(openmetrics)
    content_type = OPENMETRICS_CONTENT_TYPE if openmetrics else PROMETHEUS_CONTENT_TYPE
    return web.Response(text=text, headers={"Content-Type": content_type})


def probe_app(listener: str, backend: ProbeBackend, *middlewares: Any) -> web.Application:
    """An application serving the probes (GET, and HEAD as aiohttp adds it) over `backend`;
    `middlewares` run outside the problem pages, a listener adds its own routes after."""
    app = web.Application(middlewares=[*middlewares, problems])
    app[_PROBED] = backend
    app[_LISTENER] = listener
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app
