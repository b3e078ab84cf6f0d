"""The admin listener (SPEC §8): an aiohttp application, never on the request path.

/healthz, /readyz and /metrics are open (probes and scrapers, gateway/probes.py); /admin/* needs
the bearer token when one is configured.  The token is read from the backend on every call, so a
reload that changes it applies at once; it is compared in constant time, as bytes, and never
logged.  Any credential that is not exactly `Bearer <token68>` (scheme in any case) is a 401,
never a 500.
"""

from __future__ import annotations

import hmac
from typing import Any, Protocol

from aiohttp import web

from gateway.bearer import bearer_token
from gateway.probes import ProbeBackend, json_response, probe_app, problem


class AdminBackend(ProbeBackend, Protocol):
    def admin_token(self) -> str | None: ...
    def config_info(self) -> dict[str, Any]: ...
    def routes_info(self) -> list[dict[str, Any]]: ...
    def upstreams_info(self) -> list[dict[str, Any]]: ...
    async def reload(self) -> dict[str, Any]: ...


_BACKEND = web.AppKey("backend", AdminBackend)


def _is_authorized(request: web.Request, token: str) -> bool:
    values = request.headers.getall("Authorization", [])
    if len(values) != 1:
        return False  # none, or two (which one would count?): the data plane's rule too
    given = bearer_token(values[0])
    if given is None:
        return False
    # the given token is ASCII (token68); the configured one may be anything YAML can hold
    return hmac.compare_digest(given.encode("ascii"), token.encode("utf-8", "surrogatepass"))


@web.middleware
async def _guard(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path.startswith("/admin/"):
        token = request.app[_BACKEND].admin_token()
        if token and not _is_authorized(request, token):
            return problem(
                401,
                "unauthenticated",
                "Unauthorized",
                "the admin API needs a bearer token",
                **{"WWW-Authenticate": 'Bearer realm="gateway-admin"'},
            )
    response: web.StreamResponse = await handler(request)
    return response


async def _config(request: web.Request) -> web.Response:
    return json_response(request.app[_BACKEND].config_info())


async def _routes(request: web.Request) -> web.Response:
    return json_response(request.app[_BACKEND].routes_info())


async def _upstreams(request: web.Request) -> web.Response:
    return json_response(request.app[_BACKEND].upstreams_info())


async def _stores(request: web.Request) -> web.Response:
    return json_response(request.app[_BACKEND].stores_info())


async def _reload(request: web.Request) -> web.Response:
    result = await request.app[_BACKEND].reload()
    return json_response(result, 200 if result.get("ok") else 422)


def build_admin_app(backend: AdminBackend) -> web.Application:
    # the token guard runs first: an unauthorized caller learns nothing, not even a 404
    app = probe_app("admin", backend, _guard)
    app[_BACKEND] = backend
    app.router.add_get("/admin/config", _config)
    app.router.add_get("/admin/routes", _routes)
    app.router.add_get("/admin/upstreams", _upstreams)
    app.router.add_get("/admin/stores", _stores)
    app.router.add_post("/admin/reload", _reload)
    return app
