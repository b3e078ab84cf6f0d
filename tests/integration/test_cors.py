"""The `cors` stage over real sockets: preflights answered by the gateway (the upstream counts
its hits and sees none), headers on allowed origins only, an upstream that reflects any Origin
kept from widening the list, `Vary`, the attacks (reflection, suffix and prefix tricks, `null`,
mixed case, two Origin headers), a later stage's 429 readable by the script, `*`, metrics, the
access log, and a reload."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import port_of, running_gateway, write_config
from tests.support.metrics import Samples, scrape, value
from tests.support.raw import RawResponse, exchange

HITS = web.AppKey("hits", list)


async def _reflecting(request: web.Request) -> web.Response:
    """A careless upstream: it allows whatever origin asks, and varies on encoding."""
    request.app[HITS].append(request.method)
    headers = {"Vary": "Accept-Encoding", "Access-Control-Allow-Credentials": "true"}
    origin = request.headers.get("Origin")
    if origin is not None:
        headers["Access-Control-Allow-Origin"] = origin
    return web.Response(text="upstream", headers=headers)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[int, list[str]]]:
    """(port, the methods of the requests it received)."""
    app = web.Application()
    hits: list[str] = []
    app[HITS] = hits
    app.router.add_route("*", "/{tail:.*}", _reflecting)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        assert server.port is not None
        yield server.port, hits
    finally:
        await server.close()


APP = {
    "allow_origins": ["https://app.example.com", "https://*.preview.example.com"],
    "allow_methods": ["GET", "PUT", "DELETE"],
    "allow_headers": ["Authorization", "Content-Type"],
    "expose_headers": ["X-Request-Id"],
    "allow_credentials": True,
    "max_age": "10m",
}


#: a stage in front of cors: cors is then not its route's first stage, and edits the response
#: in its own coroutine rather than leaving the edit to the connection (pipeline.ResponseEdit)
FRONT = {"ip_filter": {"allow": ["127.0.0.0/8"]}}


@pytest.fixture(params=[False, True], ids=["cors-first", "cors-behind-a-stage"])
def behind(request: pytest.FixtureRequest) -> bool:
    """Whether the routes put a stage in front of cors: the answers must not differ."""
    return bool(request.param)


def _config(port: int, cors: dict[str, Any] = APP, *, behind: bool = False, **sections: Any) -> str:
    front = [FRONT] if behind else []
    return gateway_yaml(
        upstreams={"app": upstream_to(f"http://127.0.0.1:{port}")},
        routes=[
            route(
                "limited",
                "app",
                "/limited",
                pipeline=[
                    *front,
                    {"cors": cors},
                    {"rate_limit": {"rate": 1, "per": "1h", "burst": 1}},
                ],
            ),
            route(
                "public",
                "app",
                "/public",
                pipeline=[*front, {"cors": {"allow_origins": ["*"]}}],
            ),
            route("api", "app", "/", pipeline=[*front, {"cors": cors}]),
        ],
        **sections,
    )


async def _send(gw: Gateway, method: str, path: str, *headers: tuple[str, str]) -> RawResponse:
    lines = "".join(f"{n}: {v}\r\n" for n, v in headers)
    request = f"{method} {path} HTTP/1.1\r\nHost: api\r\n{lines}Content-Length: 0\r\n\r\n"
    return await exchange(port_of(gw), request.encode("latin-1"))


def _counted(samples: Samples, outcome: str) -> float:
    return value(samples, "gateway_stage_total", route="api", stage="cors", outcome=outcome)


def _all(response: RawResponse, name: str) -> list[str]:
    return [v for n, v in response.headers if n.lower() == name]


def _cors_headers(response: RawResponse) -> dict[str, list[str]]:
    return {
        n.lower(): _all(response, n.lower())
        for n, _ in response.headers
        if n.lower().startswith("access-control-")
    }


async def test_a_preflight_is_answered_without_the_upstream(
    tmp_path: Path, upstream: tuple[int, list[str]], behind: bool
) -> None:
    port, hits = upstream
    async with running_gateway(tmp_path, _config(port, behind=behind)) as gw:
        response = await _send(
            gw,
            "OPTIONS",
            "/orders/7",
            ("Origin", "https://app.example.com"),
            ("Access-Control-Request-Method", "PUT"),
            ("Access-Control-Request-Headers", "authorization,content-type"),
        )
        assert response.status == 204
        assert _cors_headers(response) == {
            "access-control-allow-origin": ["https://app.example.com"],
            "access-control-allow-credentials": ["true"],
            "access-control-allow-methods": ["GET, PUT, DELETE"],
            "access-control-allow-headers": ["Authorization, Content-Type"],
            "access-control-max-age": ["600"],
        }
        assert _all(response, "vary") == ["Origin"]
        assert response.header("content-length") is None
        assert response.body == b""
        # a preview deployment's subdomain, any depth
        response = await _send(
            gw,
            "OPTIONS",
            "/",
            ("Origin", "https://pr-12.eu.preview.example.com"),
            ("Access-Control-Request-Method", "DELETE"),
        )
        assert response.header("access-control-allow-origin") == (
            "https://pr-12.eu.preview.example.com"
        )
        # refused: no CORS header at all, still no upstream
        for headers in (
            [("Origin", "https://evil.example"), ("Access-Control-Request-Method", "GET")],
            [("Origin", "https://app.example.com"), ("Access-Control-Request-Method", "PATCH")],
            [
                ("Origin", "https://app.example.com"),
                ("Access-Control-Request-Method", "GET"),
                ("Access-Control-Request-Headers", "x-admin"),
            ],
        ):
            response = await _send(gw, "OPTIONS", "/orders/7", *headers)
            assert response.status == 204
            assert _cors_headers(response) == {}
            assert _all(response, "vary") == ["Origin"]
        assert hits == []
        samples = await scrape(gw)
        assert _counted(samples, "preflight") == 2
        assert _counted(samples, "preflight_rejected") == 3


async def test_an_allowed_origin_gets_the_gateways_headers_not_the_upstreams(
    tmp_path: Path, upstream: tuple[int, list[str]], behind: bool
) -> None:
    port, hits = upstream
    async with running_gateway(tmp_path, _config(port, behind=behind)) as gw:
        response = await _send(gw, "PUT", "/orders/7", ("Origin", "https://APP.example.com"))
        assert response.status == 200
        assert response.body == b"upstream"
        assert _cors_headers(response) == {
            # the upstream's reflection of the mixed-case origin is gone: one value, ours
            "access-control-allow-origin": ["https://app.example.com"],
            "access-control-allow-credentials": ["true"],
            "access-control-expose-headers": ["X-Request-Id"],
        }
        assert _all(response, "vary") == ["Accept-Encoding, Origin"]
        # an OPTIONS request that is not a preflight goes on like any other
        response = await _send(gw, "OPTIONS", "/", ("Origin", "https://app.example.com"))
        assert response.status == 200
        assert response.header("access-control-allow-origin") == "https://app.example.com"
        assert hits == ["PUT", "OPTIONS"]


@pytest.mark.parametrize(
    "origins",
    [
        pytest.param(["https://evil.example"], id="reflection"),
        pytest.param(["https://app.example.com.evil.example"], id="suffix-trick"),
        pytest.param(["https://evilapp.example.com"], id="prefix-trick"),
        pytest.param(["https://evil.example?.preview.example.com"], id="query-trick"),
        pytest.param(["https://evil.example/.preview.example.com"], id="path-trick"),
        pytest.param(["http://app.example.com"], id="other-scheme"),
        pytest.param(["https://app.example.com:8443"], id="other-port"),
        pytest.param(["https://preview.example.com"], id="wildcard-apex"),
        pytest.param(["null"], id="null"),
        pytest.param(["https://app.example.com", "https://evil.example"], id="two-origins"),
        pytest.param(["https://evil.example", "https://app.example.com"], id="two-reversed"),
    ],
)
async def test_a_refused_origin_goes_upstream_and_gets_no_cors_header(
    tmp_path: Path, upstream: tuple[int, list[str]], behind: bool, origins: list[str]
) -> None:
    port, hits = upstream
    async with running_gateway(tmp_path, _config(port, behind=behind)) as gw:
        response = await _send(gw, "GET", "/orders", *(("Origin", o) for o in origins))
        # CORS is the browser's to enforce: the request went on, its answer is kept from scripts
        assert response.status == 200
        assert hits == ["GET"]
        assert _cors_headers(response) == {}
        assert _all(response, "vary") == ["Accept-Encoding, Origin"]
        samples = await scrape(gw)
        assert _counted(samples, "rejected") == 1


async def test_a_later_refusal_is_readable_by_the_script(
    tmp_path: Path, upstream: tuple[int, list[str]], behind: bool
) -> None:
    port, hits = upstream
    async with running_gateway(tmp_path, _config(port, behind=behind)) as gw:
        origin = ("Origin", "https://app.example.com")
        assert (await _send(gw, "GET", "/limited", origin)).status == 200
        refused = await _send(gw, "GET", "/limited", origin)
        assert refused.status == 429
        assert refused.header("content-type") == "application/problem+json"
        assert json.loads(refused.body)["code"] == "rate_limited"
        assert _cors_headers(refused) == {
            "access-control-allow-origin": ["https://app.example.com"],
            "access-control-allow-credentials": ["true"],
            "access-control-expose-headers": ["X-Request-Id"],
        }
        assert _all(refused, "vary") == ["Origin"]
        # preflights are answered before the limit: they never spend the client's tokens
        preflight = await _send(
            gw, "OPTIONS", "/limited", origin, ("Access-Control-Request-Method", "GET")
        )
        assert preflight.status == 204
        assert hits == ["GET"]


async def test_star_is_the_same_answer_for_everyone(
    tmp_path: Path, upstream: tuple[int, list[str]], behind: bool
) -> None:
    port, hits = upstream
    async with running_gateway(tmp_path, _config(port, behind=behind)) as gw:
        for headers in ([], [("Origin", "https://evil.example")], [("Origin", "null")]):
            response = await _send(gw, "GET", "/public/logo.svg", *headers)
            # never a reflection, and the upstream's own is replaced
            assert _cors_headers(response) == {"access-control-allow-origin": ["*"]}
            assert _all(response, "vary") == ["Accept-Encoding"]
        preflight = await _send(
            gw,
            "OPTIONS",
            "/public/logo.svg",
            ("Origin", "https://anyone.example"),
            ("Access-Control-Request-Method", "GET"),
        )
        assert preflight.status == 204
        assert preflight.header("access-control-allow-origin") == "*"
        assert len(hits) == 3


async def test_a_route_that_lists_methods_without_options_refuses_preflights_at_routing(
    tmp_path: Path, upstream: tuple[int, list[str]]
) -> None:
    """Documented: routing comes first, so such a route must list OPTIONS."""
    port, hits = upstream
    config = gateway_yaml(
        upstreams={"app": upstream_to(f"http://127.0.0.1:{port}")},
        routes=[route("only-get", "app", methods=["GET"], pipeline=[{"cors": APP}])],
    )
    async with running_gateway(tmp_path, config) as gw:
        response = await _send(
            gw,
            "OPTIONS",
            "/only-get",
            ("Origin", "https://app.example.com"),
            ("Access-Control-Request-Method", "GET"),
        )
        assert response.status == 405
        assert json.loads(response.body)["code"] == "method_not_allowed"
        assert hits == []


async def test_outcomes_in_the_access_log(
    tmp_path: Path, upstream: tuple[int, list[str]], capfd: pytest.CaptureFixture[str]
) -> None:
    port, _ = upstream
    async with running_gateway(tmp_path, _config(port, access_log={"enabled": True})) as gw:
        await _send(
            gw,
            "OPTIONS",
            "/a",
            ("Origin", "https://app.example.com"),
            ("Access-Control-Request-Method", "GET"),
        )
        await _send(gw, "GET", "/b", ("Origin", "https://app.example.com"))
        await _send(gw, "GET", "/c", ("Origin", "https://evil.example"))
        await _send(gw, "GET", "/d")
        gw.snapshot.access_log.flush()
    lines = [json.loads(x) for x in capfd.readouterr().out.splitlines() if x.startswith("{")]
    stages = {x["path"]: x.get("stages") for x in lines if x.get("route") == "api"}
    assert stages == {
        "/a": {"cors": "preflight"},
        "/b": {"cors": "allowed"},
        "/c": {"cors": "rejected"},
        "/d": {},
    }


async def test_a_reload_changes_the_list_live(
    tmp_path: Path, upstream: tuple[int, list[str]]
) -> None:
    port, _ = upstream
    async with running_gateway(tmp_path, _config(port)) as gw:
        origin = ("Origin", "https://new.example.org")
        assert (await _send(gw, "GET", "/", origin)).header("access-control-allow-origin") is None
        write_config(
            tmp_path,
            _config(
                port, {**APP, "allow_origins": [*APP["allow_origins"], "https://new.example.org"]}
            ),
        )
        assert (await gw.reload())["ok"] is True
        response = await _send(gw, "GET", "/", origin)
        assert response.header("access-control-allow-origin") == "https://new.example.org"
        # an invalid list is refused whole: the previous one keeps serving
        write_config(tmp_path, _config(port, {**APP, "allow_origins": ["*"]}))
        result = await gw.reload()
        assert result["ok"] is False
        assert "allow_origins: * cannot be combined with allow_credentials: true" in str(
            result["error"]
        )
        response = await _send(gw, "GET", "/", origin)
        assert response.header("access-control-allow-origin") == "https://new.example.org"
