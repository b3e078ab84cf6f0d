"""Spellings of the Host and of other headers that used to reach a place they must not (issue 11,
defects 2, 7, 8 and 9, and their classes).

The gateway under test has a host-matched route protected by a jwt stage and a public catch-all:
every spelling of the protected host must reach the protected route (401 without a token), and
no header a client can spell differently may pass as one the gateway or an upstream trusts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from tests.integration.conftest import Seen, upstream_app
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import port_of, running_gateway
from tests.support.raw import close_writer, exchange, is_closed, open_raw, read_response
from tests.support.tokens import claims, token

SECRET = "s" * 40


def _config(port: int, trusted: list[str]) -> str:
    jwt = {"secret": SECRET, "algorithms": ["HS256"]}
    forwarding_jwt = {"jwt": {**jwt, "forward_claims": {"sub": "X-User-Id"}}}
    return gateway_yaml(
        limits={"header_timeout": "2s", "body_timeout": "2s"},
        trusted_proxies=trusted,
        upstreams={"app": upstream_to(f"http://127.0.0.1:{port}")},
        routes=[
            route(
                "api",
                "app",
                match={"host": "api.example.com", "path_prefix": "/"},
                pipeline=[forwarding_jwt],
            ),
            route(
                "ipv6", "app", match={"host": "[::1]", "path_prefix": "/"}, pipeline=[{"jwt": jwt}]
            ),
            route(
                "underscores-allowed", "app", "/legacy", http={"underscores_in_headers": "allow"}
            ),
            route(
                "underscores-allowed-with-jwt",
                "app",
                "/legacy-auth",
                http={"underscores_in_headers": "allow"},
                pipeline=[forwarding_jwt],
            ),
            route(
                "underscores-rejected", "app", "/strict", http={"underscores_in_headers": "reject"}
            ),
            route(
                "limited",
                "app",
                "/limited",
                pipeline=[
                    {"rate_limit": {"rate": 1, "per": "1m", "burst": 1, "key": "header:X-Api-Key"}}
                ],
            ),
            route("keyed", "app", "/keyed", pipeline=[{"idempotency": {"methods": ["POST"]}}]),
            route("public", "app"),
        ],
    )


async def _gateway(tmp_path: Path, trusted: list[str]) -> AsyncIterator[tuple[Gateway, Seen]]:
    seen = Seen()
    server = TestServer(upstream_app(seen), host="127.0.0.1")
    await server.start_server()
    assert server.port is not None
    try:
        async with running_gateway(tmp_path, _config(server.port, trusted)) as gateway:
            yield gateway, seen
    finally:
        await server.close()


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Seen]]:
    async for pair in _gateway(tmp_path, []):
        yield pair


@pytest.fixture
async def behind_proxy(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Seen]]:
    async for pair in _gateway(tmp_path, ["127.0.0.1/32"]):
        yield pair


def _headers(seen: Seen) -> dict[bytes, list[bytes]]:
    """The last upstream request's headers: lower-case name -> every value, in order."""
    found: dict[bytes, list[bytes]] = {}
    for name, value in seen.requests[-1]["headers"]:
        found.setdefault(bytes(name).lower(), []).append(bytes(value))
    return found


# -- the Host header (defect 2) -------------------------------------------------------------

PROTECTED_SPELLINGS = {
    "plain": b"api.example.com",
    "trailing_space": b"api.example.com ",
    "trailing_tab": b"api.example.com\t",
    "spaces_around": b"  api.example.com  ",
    "upper_case": b"API.Example.COM",
    "port": b"api.example.com:8080",
    "trailing_dot": b"api.example.com.",
    "trailing_dot_and_port": b"api.example.com.:443",
    "all_at_once": b"API.EXAMPLE.COM.:80 \t",
}


@pytest.mark.parametrize("name", sorted(PROTECTED_SPELLINGS))
async def test_every_spelling_of_a_host_reaches_its_route(
    name: str, edge: tuple[Gateway, Seen]
) -> None:
    gateway, seen = edge
    host = PROTECTED_SPELLINGS[name]
    response = await exchange(port_of(gateway), b"GET /x HTTP/1.1\r\nHost: %b\r\n\r\n" % host)
    assert response.status == 401, name  # the jwt stage of the host route answered
    assert seen.requests == []


@pytest.mark.parametrize("host", [b"[::1]", b"[::1]:8080", b"[0:0:0:0:0:0:0:1]"])
async def test_ipv6_host_reaches_its_route(host: bytes, edge: tuple[Gateway, Seen]) -> None:
    gateway, _ = edge
    response = await exchange(port_of(gateway), b"GET /x HTTP/1.1\r\nHost: %b\r\n\r\n" % host)
    assert response.status == 401


INVALID_HOSTS = {
    "comma": b"api.example.com,evil.test",
    "inner_space": b"api.example .com",
    "at_sign": b"user@api.example.com",
    "percent": b"%61pi.example.com",
    "semicolon": b"api.example.com;x",
    "slash": b"api.example.com/x",
    "empty_label": b"api..example.com",
    "two_trailing_dots": b"api.example.com..",
    "leading_dot": b".api.example.com",
    "only_port": b":8080",
    "bad_port": b"api.example.com:80a",
    "long_port": b"api.example.com:123456",
    "port_too_big": b"api.example.com:65536",
    "two_colons": b"api.example.com:80:80",
    "unclosed_ipv6": b"[::1",
    "bad_ipv6": b"[zz::1]",
    "ipv6_zone": b"[fe80::1%25eth0]",
    "bare_ipv6": b"::1",
    "junk_after_ipv6": b"[::1]x",
    "underscore_and_bracket": b"a_b]",
    "non_ascii": b"api.\xe9xample.com",
}


@pytest.mark.parametrize("name", sorted(INVALID_HOSTS))
async def test_invalid_host_is_400(name: str, edge: tuple[Gateway, Seen]) -> None:
    gateway, seen = edge
    port = port_of(gateway)
    reader, writer = await open_raw(port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: %b\r\n\r\n" % INVALID_HOSTS[name])
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 400, name
    assert json.loads(response.body)["code"] == "bad_request"
    assert await is_closed(reader)
    await close_writer(writer)
    assert seen.requests == []


async def test_upstream_receives_the_normalized_host(edge: tuple[Gateway, Seen]) -> None:
    gateway, seen = edge
    response = await exchange(
        port_of(gateway), b"GET /x HTTP/1.1\r\nHost: Public.Example.ORG.:8080 \r\n\r\n"
    )
    assert response.status == 200
    headers = _headers(seen)
    assert headers[b"host"] == [b"public.example.org:8080"]
    assert headers[b"x-forwarded-host"] == [b"public.example.org:8080"]


async def test_empty_host_reaches_only_routes_without_a_host(edge: tuple[Gateway, Seen]) -> None:
    gateway, seen = edge
    response = await exchange(port_of(gateway), b"GET /x HTTP/1.1\r\nHost: \r\n\r\n")
    assert response.status == 200
    assert seen.requests[-1]["path"] == "/x"


# -- one header, several copies (defect 9 and its class) -------------------------------------


@pytest.mark.parametrize(
    "second",
    [b"Authorization: Bearer x", b"authorization: Basic eA==", b"AUTHORIZATION:"],
    ids=["same_scheme", "other_scheme", "empty"],
)
async def test_two_authorization_headers_are_400(second: bytes, edge: tuple[Gateway, Seen]) -> None:
    gateway, seen = edge
    good = token(None, claims(), secret=SECRET.encode())
    reader, writer = await open_raw(port_of(gateway))
    writer.write(
        b"GET /x HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer %b\r\n%b\r\n\r\n"
        % (good.encode(), second)
    )
    response = await asyncio.wait_for(read_response(reader), 5)
    assert response.status == 400
    assert "Authorization" in json.loads(response.body)["detail"]
    assert await is_closed(reader)
    await close_writer(writer)
    assert seen.requests == []


async def test_one_authorization_header_passes(edge: tuple[Gateway, Seen]) -> None:
    gateway, seen = edge
    good = token(None, claims(), secret=SECRET.encode())
    response = await exchange(
        port_of(gateway),
        b"GET /x HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer %b\r\n\r\n"
        % good.encode(),
    )
    assert response.status == 200
    assert _headers(seen)[b"x-user-id"] == [b"alice"]


async def test_header_values_are_compared_without_surrounding_whitespace(
    edge: tuple[Gateway, Seen],
) -> None:
    """A rate-limit key "k", "k " and "k\\t" is one key: whitespace is not a new client."""
    gateway, seen = edge
    port = port_of(gateway)
    statuses = []
    for value in (b"k", b"k ", b"k\t", b" k"):
        response = await exchange(
            port, b"GET /limited HTTP/1.1\r\nHost: a\r\nX-Api-Key: %b\r\n\r\n" % value
        )
        statuses.append(response.status)
    assert statuses == [200, 429, 429, 429]
    assert len(seen.requests) == 1


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /limited HTTP/1.1\r\nHost: a\r\nX-Api-Key: k1\r\nX-Api-Key: k2\r\n\r\n",
        b"POST /keyed HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k1\r\n"
        b"idempotency-key: k2\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["rate_limit_key", "idempotency_key"],
)
async def test_two_copies_of_a_header_a_stage_decides_on_are_400(
    request_bytes: bytes, edge: tuple[Gateway, Seen]
) -> None:
    """The stage would read the first copy, an upstream perhaps the last: a fresh rate-limit
    bucket per request, or a key the gateway and an upstream that deduplicates disagree on."""
    gateway, seen = edge
    response = await exchange(port_of(gateway), request_bytes)
    assert response.status == 400
    assert "more than one" in json.loads(response.body)["detail"]
    assert seen.requests == []


# -- names with underscores (defect 7) -------------------------------------------------------

UNDERSCORED = (
    b"X_User_Id: admin\r\nX_Forwarded_For: 6.6.6.6\r\nClient_Cert: :Zm9v:\r\n"
    b"X-Request_Id: forged\r\n"
)


async def test_underscored_names_are_dropped_by_default(edge: tuple[Gateway, Seen]) -> None:
    gateway, seen = edge
    good = token(None, claims(sub="bob"), secret=SECRET.encode())
    response = await exchange(
        port_of(gateway),
        b"GET /x HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer %b\r\n%b\r\n"
        % (good.encode(), UNDERSCORED),
    )
    assert response.status == 200
    headers = _headers(seen)
    assert not [name for name in headers if b"_" in name]
    # what a CGI/WSGI upstream would read as X-User-Id is only the jwt stage's
    assert headers[b"x-user-id"] == [b"bob"]
    assert headers[b"x-forwarded-for"] == [b"127.0.0.1"]


async def test_a_route_may_allow_underscored_names(edge: tuple[Gateway, Seen]) -> None:
    gateway, seen = edge
    response = await exchange(
        port_of(gateway), b"GET /legacy HTTP/1.1\r\nHost: a\r\nMy_Header: 1\r\n\r\n"
    )
    assert response.status == 200
    assert _headers(seen)[b"my_header"] == [b"1"]


async def test_allowed_underscores_never_spell_a_header_the_gateway_owns(
    edge: tuple[Gateway, Seen],
) -> None:
    """Found by probing: on a route that allows "_", X_User_Id reached the upstream beside the
    jwt stage's X-User-Id — or alone, when the claim could not be forwarded."""
    gateway, seen = edge
    good = token(None, claims(sub="bob"), secret=SECRET.encode())
    response = await exchange(
        port_of(gateway),
        b"GET /legacy-auth HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer %b\r\n"
        b"X_User_Id: admin\r\nX-User_Id: admin2\r\nX_Forwarded_For: 6.6.6.6\r\n"
        b"X_Real_IP: 6.6.6.6\r\nClient_Cert: :Zm9v:\r\nMy_Header: 1\r\n\r\n" % good.encode(),
    )
    assert response.status == 200
    headers = _headers(seen)
    assert headers[b"x-user-id"] == [b"bob"]
    for name in (b"x_user_id", b"x-user_id", b"x_forwarded_for", b"x_real_ip", b"client_cert"):
        assert name not in headers, name
    assert headers[b"my_header"] == [b"1"]


async def test_a_route_may_reject_underscored_names(edge: tuple[Gateway, Seen]) -> None:
    gateway, seen = edge
    response = await exchange(
        port_of(gateway), b"GET /strict HTTP/1.1\r\nHost: a\r\nMy_Header: 1\r\n\r\n"
    )
    assert response.status == 400
    assert "'_'" in json.loads(response.body)["detail"]
    assert seen.requests == []
    response = await exchange(port_of(gateway), b"GET /strict HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.status == 200


# -- client-address, URL and method claims (defect 8) ----------------------------------------

CLAIMS = [
    b"X-Real-IP: 6.6.6.6",
    b"True-Client-IP: 6.6.6.6",
    b"X-Client-IP: 6.6.6.6",
    b"X-Cluster-Client-IP: 6.6.6.6",
    b"CF-Connecting-IP: 6.6.6.6",
    b"Fastly-Client-IP: 6.6.6.6",
    b"X-Original-Forwarded-For: 6.6.6.6",
    b"X-Forwarded-Port: 1",
    b"X-Forwarded-Prefix: /admin",
    b"X-Forwarded-Server: evil",
    b"X-Forwarded-Scheme: https",
    b"X-Forwarded-Ssl: on",
    b"X-Url-Scheme: https",
    b"Front-End-Https: on",
    b"X-Original-URL: /admin",
    b"X-Original-URI: /admin",
    b"X-Rewrite-URL: /admin",
    b"X-Original-Host: admin.internal",
    b"X-Host: admin.internal",
    b"X-HTTP-Method-Override: DELETE",
    b"X-HTTP-Method: DELETE",
    b"X-Method-Override: DELETE",
    b"X-Original-Method: DELETE",
    b"Client-IP: 6.6.6.6",
    b"X-Forwarded: for=6.6.6.6",
    b"Forwarded-For: 6.6.6.6",
    b"X-Originating-IP: 6.6.6.6",
    b"X-Envoy-Original-Path: /admin",
    b"X-Forwarded-Uri: /admin",
    b"X-Forwarded-User: admin",
    b"X-Auth-Request-User: admin",
    b"Remote-User: admin",
    b"Ssl-Client-Cert: forged",
    b"X-SSL-Client-Cert: forged",
    b"X-Forwarded-Tls-Client-Cert: forged",
    # whole families, by prefix
    b"X-Forwarded-Groups: admins",
    b"X-Forwarded-Access-Token: t",
    b"X-Auth-Request-Preferred-Username: admin",
    b"X-Remote-Group: system:masters",
    b"X-Remote-Extra-Scopes: all",
    b"Impersonate-User: admin",
    b"Impersonate-Group: system:masters",
    b"X-Ssl-Client-Dn: CN=admin",
    b"Ssl-Client-Verify: SUCCESS",
    b"X-Client-Verify: SUCCESS",
    b"X-Tls-Client-Cert: forged",
    b"X-Amzn-Oidc-Identity: admin",
    b"X-Ms-Client-Principal-Name: admin",
    b"X-Goog-Authenticated-User-Email: admin@example.com",
    b"Cf-Access-Authenticated-User-Email: admin@example.com",
    b"Cf-Connecting-Ipv6: ::6",
    b"WL-Proxy-Client-IP: 6.6.6.6",
    b"X-Consumer-Username: admin",
    b"X-Webauth-User: admin",
]
ALWAYS_DROPPED = [b"Proxy: http://evil.test:3128", b"Proxy-Foo: 1", b"Proxy-Authorization: x"]


def _request_with(lines: list[bytes]) -> bytes:
    return b"GET /x HTTP/1.1\r\nHost: a\r\n%b\r\n\r\n" % b"\r\n".join(lines)


async def test_claims_from_an_untrusted_peer_are_dropped(edge: tuple[Gateway, Seen]) -> None:
    gateway, seen = edge
    response = await exchange(port_of(gateway), _request_with(CLAIMS + ALWAYS_DROPPED))
    assert response.status == 200
    headers = _headers(seen)
    for line in CLAIMS + ALWAYS_DROPPED:
        assert line.split(b":")[0].lower() not in headers, line


async def test_claims_from_a_trusted_proxy_are_kept(behind_proxy: tuple[Gateway, Seen]) -> None:
    gateway, seen = behind_proxy
    response = await exchange(port_of(gateway), _request_with(CLAIMS + ALWAYS_DROPPED))
    assert response.status == 200
    headers = _headers(seen)
    for line in CLAIMS:
        name, _, value = line.partition(b": ")
        assert headers[name.lower()] == [value], line
    for line in ALWAYS_DROPPED:  # httpoxy and Proxy-* never pass, whoever sends them
        assert line.split(b":")[0].lower() not in headers, line


async def test_forwarded_from_an_untrusted_peer_is_replaced(edge: tuple[Gateway, Seen]) -> None:
    gateway, seen = edge
    response = await exchange(
        port_of(gateway),
        b"GET /x HTTP/1.1\r\nHost: a.test:8080\r\nForwarded: for=6.6.6.6;proto=https\r\n"
        b"Forwarded: for=7.7.7.7\r\n\r\n",
    )
    assert response.status == 200
    assert _headers(seen)[b"forwarded"] == [b'for=127.0.0.1;proto=http;host="a.test:8080"']


async def test_forwarded_from_a_trusted_proxy_gets_this_hop(
    behind_proxy: tuple[Gateway, Seen],
) -> None:
    gateway, seen = behind_proxy
    response = await exchange(
        port_of(gateway),
        b"GET /x HTTP/1.1\r\nHost: a.test\r\nForwarded: for=192.0.2.1;proto=https\r\n\r\n",
    )
    assert response.status == 200
    assert _headers(seen)[b"forwarded"] == [
        b"for=192.0.2.1;proto=https, for=127.0.0.1;proto=http;host=a.test"
    ]


async def test_no_forwarded_header_is_invented(edge: tuple[Gateway, Seen]) -> None:
    gateway, seen = edge
    response = await exchange(port_of(gateway), b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.status == 200
    assert b"forwarded" not in _headers(seen)


async def test_connection_cannot_unset_the_rewritten_forwarded(edge: tuple[Gateway, Seen]) -> None:
    gateway, seen = edge
    response = await exchange(
        port_of(gateway),
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: forwarded, x-real-ip\r\n"
        b"Forwarded: for=6.6.6.6\r\n\r\n",
    )
    assert response.status == 200
    assert _headers(seen)[b"forwarded"] == [b"for=127.0.0.1;proto=http;host=a"]
