"""Path spellings an upstream may read differently from the gateway (issue 11, "Also").

The gateway normalizes the path once (dot segments, "//", unreserved escapes), but some upstreams
go further: Tomcat and Spring strip ";params" from segments (so "/..;/api" is "/../api"), some
decode twice ("%252e" is "."), some match case-insensitively ("/API" is "/api").  A public
catch-all route in front of such an upstream would forward those spellings onto a protected
path, so by default they are refused with 400, and a route that needs them says so.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from tests.integration.conftest import Seen, upstream_app
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import port_of, running_gateway
from tests.support.raw import exchange

SECRET = "s" * 40


@pytest.fixture
async def paths_gw(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Seen]]:
    seen = Seen()
    server = TestServer(upstream_app(seen), host="127.0.0.1")
    await server.start_server()
    jwt = [{"jwt": {"secret": SECRET, "algorithms": ["HS256"]}}]
    legacy = {"path_semicolons": "allow", "path_escapes": ["percent", "semicolon"]}
    config = gateway_yaml(
        upstreams={"app": upstream_to(f"http://127.0.0.1:{server.port}")},
        routes=[
            route(
                "api", "app", match={"path_prefix": "/api", "case_insensitive": True}, pipeline=jwt
            ),
            route("admin", "app", "/admin", pipeline=jwt),
            route("legacy", "app", "/legacy", http=legacy),
            route("public", "app"),
        ],
    )
    try:
        async with running_gateway(tmp_path, config) as gateway:
            yield gateway, seen
    finally:
        await server.close()


REFUSED = {
    "semicolon_segment": b"/api;x/x",
    "dotdot_semicolon": b"/..;/admin/x",
    "dot_semicolon": b"/x/.;/admin",
    "jsessionid": b"/x;jsessionid=1",
    "double_encoded_dot": b"/%252e/admin/x",
    "encoded_percent": b"/x/100%25",
    "encoded_semicolon": b"/admin%3bx",
    "encoded_question_mark": b"/admin%3F/x",
    "encoded_hash": b"/admin%23/x",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
async def test_ambiguous_paths_are_refused_on_a_public_route(
    name: str, paths_gw: tuple[Gateway, Seen]
) -> None:
    gateway, seen = paths_gw
    response = await exchange(
        port_of(gateway), b"GET %b HTTP/1.1\r\nHost: a\r\n\r\n" % REFUSED[name]
    )
    assert response.status == 400, name
    assert json.loads(response.body)["code"] == "bad_request"
    assert seen.requests == []


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        (b"/legacy/a;b=1/c", b"/legacy/a;b=1/c"),
        (b"/legacy/100%25", b"/legacy/100%25"),
        (b"/legacy/a%3bb", b"/legacy/a%3Bb"),
    ],
    ids=["semicolon", "percent", "encoded_semicolon"],
)
async def test_a_route_may_allow_them(
    target: bytes, forwarded: bytes, paths_gw: tuple[Gateway, Seen]
) -> None:
    gateway, seen = paths_gw
    response = await exchange(port_of(gateway), b"GET %b HTTP/1.1\r\nHost: a\r\n\r\n" % target)
    assert response.status == 200
    assert seen.requests[-1]["path"].encode() == forwarded


@pytest.mark.parametrize(
    "target",
    [b"/legacy/..;/admin", b"/legacy/%2e%2e;/admin", b"/legacy/x/.;/y", b"/legacy/..;x=1/admin"],
    ids=["dotdot", "encoded_dotdot", "dot", "dotdot_with_param"],
)
async def test_dot_segments_with_parameters_are_refused_even_where_semicolons_pass(
    target: bytes, paths_gw: tuple[Gateway, Seen]
) -> None:
    """Found by probing: Tomcat and Spring read `/legacy/..;/admin` as `/admin`."""
    gateway, seen = paths_gw
    response = await exchange(port_of(gateway), b"GET %b HTTP/1.1\r\nHost: a\r\n\r\n" % target)
    assert response.status == 400
    assert "dot segment" in json.loads(response.body)["detail"]
    assert seen.requests == []


async def test_allowed_escapes_are_only_those_listed(paths_gw: tuple[Gateway, Seen]) -> None:
    gateway, seen = paths_gw
    response = await exchange(port_of(gateway), b"GET /legacy/a%3F HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.status == 400
    assert seen.requests == []


@pytest.mark.parametrize("path", [b"/API/x", b"/Api", b"/aPI/deep/er"])
async def test_case_insensitive_route_is_reached_in_any_case(
    path: bytes, paths_gw: tuple[Gateway, Seen]
) -> None:
    gateway, seen = paths_gw
    response = await exchange(port_of(gateway), b"GET %b HTTP/1.1\r\nHost: a\r\n\r\n" % path)
    assert response.status == 401  # the protected route's jwt stage answered
    assert seen.requests == []


async def test_case_sensitive_route_is_not(paths_gw: tuple[Gateway, Seen]) -> None:
    """The documented default: /ADMIN is another path, served by the public catch-all; only
    `case_insensitive: true` protects a route from an upstream that ignores case."""
    gateway, seen = paths_gw
    response = await exchange(port_of(gateway), b"GET /ADMIN/x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.status == 200
    assert seen.requests[-1]["path"] == "/ADMIN/x"
