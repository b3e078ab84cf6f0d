"""Pipelines over real sockets: the `headers` stage, named middlewares, onion order, reloads."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestServer

from tests.integration.conftest import Seen
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import port_of, running_gateway, write_config
from tests.support.raw import exchange


def _config(port: int, tag: str = "v1") -> str:
    inline = {
        "request": {"set": {"X-Env": "prod"}, "remove": ["x-debug"]},
        "response": {
            "set": {"X-Order": "inner", "X-Frame-Options": "DENY"},
            "remove": ["X-Upstream"],
        },
    }
    return gateway_yaml(
        upstreams={"app": upstream_to(f"http://127.0.0.1:{port}")},
        middlewares={
            "tag": {
                "headers": {
                    "request": {"set": {"X-Tag": tag}},
                    "response": {"set": {"X-Order": "outer"}},
                }
            }
        },
        routes=[
            route("app", "app", pipeline=["tag", {"headers": inline}]),
            route("other", "app", "/other", pipeline=["tag"]),
        ],
    )


def _sent(seen: Seen) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in seen.requests[-1]["headers"]:
        headers.setdefault(name.decode().lower(), []).append(value.decode())
    return headers


async def test_request_and_response_edits_in_onion_order(
    tmp_path: Path, upstream: tuple[TestServer, Seen]
) -> None:
    server, seen = upstream
    async with running_gateway(tmp_path, _config(server.port)) as gw:
        response = await exchange(
            port_of(gw),
            b"GET /x HTTP/1.1\r\nHost: a\r\nX-Debug: 1\r\nX-Env: dev\r\nX-Env: qa\r\n"
            b"X-Tag: forged\r\n\r\n",
        )
        assert response.status == 200
        sent = _sent(seen)
        assert "x-debug" not in sent
        assert sent["x-env"] == ["prod"]  # set replaces every copy
        assert sent["x-tag"] == ["v1"]
        # out: the inline stage (inner) runs before the middleware (outer), which overrides it
        assert response.header("x-order") == "outer"
        assert response.header("x-frame-options") == "DENY"
        assert response.header("x-upstream") is None


async def test_connection_removes_client_headers_never_the_ones_stages_set(
    tmp_path: Path, upstream: tuple[TestServer, Seen]
) -> None:
    """Found by probing: `Connection: x-env` used to strip the X-Env the headers stage set."""
    server, seen = upstream
    async with running_gateway(tmp_path, _config(server.port)) as gw:
        response = await exchange(
            port_of(gw),
            b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: X-Env, x-tag, X-Mine, keep-alive\r\n"
            b"X-Mine: 1\r\nX-Other: 2\r\n\r\n",
        )
        assert response.status == 200
        sent = _sent(seen)
        assert sent["x-env"] == ["prod"]  # set by the route's headers stage
        assert sent["x-tag"] == ["v1"]  # set by the named middleware
        assert "x-mine" not in sent  # the client's own hop-by-hop header
        assert sent["x-other"] == ["2"]


async def test_a_middleware_is_shared_and_an_unchanged_stage_survives_reload(
    tmp_path: Path, upstream: tuple[TestServer, Seen]
) -> None:
    server, seen = upstream
    async with running_gateway(tmp_path, _config(server.port)) as gw:
        by_route = {r.name: r for r in gw.snapshot.routes}
        shared_before = gw.snapshot.stages[("middleware:tag", "headers")][1]
        inline_before = gw.snapshot.stages[("route:app:1", "headers")][1]
        assert {("middleware:tag", "headers"), ("route:app:1", "headers")} == set(
            gw.snapshot.stages
        )
        assert by_route["other"].config.pipeline[0].owner == "middleware:tag"

        # the middleware's config changes, the inline stage's does not
        write_config(tmp_path, _config(server.port, tag="v2"))
        assert (await gw.reload())["ok"] is True
        assert gw.snapshot.stages[("route:app:1", "headers")][1] is inline_before
        assert gw.snapshot.stages[("middleware:tag", "headers")][1] is not shared_before
        await exchange(port_of(gw), b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n")
        assert _sent(seen)["x-tag"] == ["v2"]


async def test_admin_routes_show_pipelines(
    tmp_path: Path, upstream: tuple[TestServer, Seen]
) -> None:
    server, _ = upstream
    async with running_gateway(tmp_path, _config(server.port)) as gw:
        routes = {r["name"]: r for r in gw.routes_info()}
        assert routes["app"]["pipeline"] == ["tag", "headers"]
        assert routes["other"]["pipeline"] == ["tag"]
