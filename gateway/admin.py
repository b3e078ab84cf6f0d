"""The admin listener (SPEC §8): an aiohttp application, never on the request path.

/healthz, /readyz and /metrics are open (probes and scrapers); /admin/* needs the bearer token
when one is configured.  The token is read from the backend on every call, so a reload that
changes it applies at once; it is compared in constant time, as bytes, and never logged.  Any
credential that is not exactly `Bearer <token68>` (scheme in any case) is a 401, never a 500.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.bearer import bearer_token
from gateway.observability.exposition import (
    OPENMETRICS_CONTENT_TYPE,
    PROMETHEUS_CONTENT_TYPE,
    wants_openmetrics,
)


class _MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse as an ERROR with a traceback that quotes the
    offending bytes — an Authorization value, say — and any client that reaches the admin port
    can send such requests as often as it likes.  Those become one line: what was wrong, from
    where, no bytes of the request."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg = "admin listener: malformed request (%s)"
            record.args = (type(error).__name__,)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = None
            record.exc_text = None
        return True


_SERVER_LOG_FILTER = _MalformedRequestFilter()


class AdminBackend(Protocol):
    @property
    def state(self) -> str: ...
    def admin_token(self) -> str | None: ...
    def config_info(self) -> dict[str, Any]: ...
    def routes_info(self) -> list[dict[str, Any]]: ...
    def upstreams_info(self) -> list[dict[str, Any]]: ...
    def stores_info(self) -> list[dict[str, Any]]: ...
    async def reload(self) -> dict[str, Any]: ...
    def metrics_text(self, openmetrics: bool = False) -> str: ...


_BACKEND = web.AppKey("backend", AdminBackend)


def _problem(status: int, code: str, title: str, detail: str, **headers: str) -> web.Response:
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


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(data, indent=2).encode(), content_type="application/json"
    )


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
            return _problem(
                401,
                "unauthenticated",
                "Unauthorized",
                "the admin API needs a bearer token",
                **{"WWW-Authenticate": 'Bearer realm="gateway-admin"'},
            )
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        allow = ", ".join(sorted(exc.allowed_methods))
        return _problem(
            405, "method_not_allowed", "Method Not Allowed", f"allowed: {allow}", Allow=allow
        )
    except web.HTTPNotFound:
        return _problem(404, "no_route", "Not Found", f"no admin endpoint at {request.path}")
    return response


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _readyz(request: web.Request) -> web.Response:
    backend = request.app[_BACKEND]
    state = backend.state
    # a shared store that is down does not make the gateway unready: its stages answer per
    # on_store_error, and taking every replica out of rotation at once would be an outage
    stores = {store["name"]: store["state"] for store in backend.stores_info()}
    body: dict[str, Any] = {"state": state}
    if stores:
        body["stores"] = stores
    return _json(body, 200 if state == "ready" else 503)


async def _metrics(request: web.Request) -> web.Response:
    # the format is the scraper's choice: Prometheus asks for OpenMetrics first by default
    openmetrics = wants_openmetrics(",".join(request.headers.getall("Accept", [])))
    text = request.app[_BACKEND].metrics_text(openmetrics)
    content_type = OPENMETRICS_CONTENT_TYPE if openmetrics else PROMETHEUS_CONTENT_TYPE
    return web.Response(text=text, headers={"Content-Type": content_type})


async def _config(request: web.Request) -> web.Response:
    return _json(request.app[_BACKEND].config_info())


async def _routes(request: web.Request) -> web.Response:
    return _json(request.app[_BACKEND].routes_info())


async def _upstreams(request: web.Request) -> web.Response:
    return _json(request.app[_BACKEND].upstreams_info())


async def _stores(request: web.Request) -> web.Response:
    return _json(request.app[_BACKEND].stores_info())


async def _reload(request: web.Request) -> web.Response:
    result = await request.app[_BACKEND].reload()
    return _json(result, 200 if result.get("ok") else 422)


def build_admin_app(backend: AdminBackend) -> web.Application:
    app = web.Application(middlewares=[_guard])
    app[_BACKEND] = backend
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/admin/config", _config)
    app.router.add_get("/admin/routes", _routes)
    app.router.add_get("/admin/upstreams", _upstreams)
    app.router.add_get("/admin/stores", _stores)
    app.router.add_post("/admin/reload", _reload)
    return app


class AdminServer:
    def __init__(self, backend: AdminBackend, host: str, port: int) -> None:
        self._app = build_admin_app(backend)
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._bound = port

    async def start(self) -> None:
        server_log = logging.getLogger("aiohttp.server")
        if _SERVER_LOG_FILTER not in server_log.filters:
            server_log.addFilter(_SERVER_LOG_FILTER)
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        # the asyncio.Server behind the site, to learn a port chosen by the OS
        sockets = getattr(site._server, "sockets", None)
        if sockets:
            self._bound = int(sockets[0].getsockname()[1])

    @property
    def port(self) -> int:
        return self._bound

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
