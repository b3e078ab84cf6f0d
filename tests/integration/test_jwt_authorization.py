"""The Authorization value the jwt stage checks is the one the upstream receives, over real
sockets, on every path that changes it before the stage runs.

The connection keeps the Authorization value it parsed (RequestHead.authorization) so that the
jwt stage need not scan the headers for it; everything that replaces the header list afterwards
must derive it again (RequestHead.replace_headers), or the stage would check a token the
upstream never receives, or let through a token it never checked.  The paths: a Connection
header naming Authorization, a headers stage before the jwt stage that removes or sets it (the
name is not one the gateway owns, so the config allows both); and, read by the connection
itself, a second copy (400), trailing whitespace and every spelling of the name.  Each case
asserts what the jwt stage decided and what the upstream received
(tests/support/wire_upstream.py: header lines as they arrived).  A claim forwarded as
Authorization is refused by the config (tests/unit/test_config_pipeline.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.app import Gateway
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import port_of, running_gateway
from tests.support.raw import RawResponse, exchange
from tests.support.tokens import claims, token
from tests.support.wire_upstream import WireUpstream, wire_upstream

SECRET = "s" * 40
JWT = {"secret": SECRET, "algorithms": ["HS256"], "forward_claims": {"sub": "X-User-Id"}}
#: the challenge of a request without a bearer token (one with a bad token says why)
MISSING = 'Bearer realm="gateway"'
#: the spellings of the header name a client may send: all one header
SPELLINGS = [b"Authorization", b"authorization", b"AUTHORIZATION", b"aUTHORIZATION"]


def _token(sub: str = "alice", secret: str = SECRET) -> bytes:
    return token(None, claims(sub=sub), secret=secret.encode()).encode()


@dataclass
class Edge:
    gateway: Gateway
    upstream: WireUpstream
    #: the token the headers stage of /set sends upstream in place of the client's
    set_token: bytes

    async def get(self, path: str, *lines: bytes) -> RawResponse:
        head = b"".join(line + b"\r\n" for line in lines)
        request = b"GET %b HTTP/1.1\r\nHost: a\r\n%b\r\n" % (path.encode(), head)
        return await exchange(port_of(self.gateway), request)

    def received(self) -> dict[bytes, list[tuple[bytes, bytes]]]:
        """The last upstream request's header lines (name as sent, value) by lower-case name."""
        found: dict[bytes, list[tuple[bytes, bytes]]] = {}
        for name, value in self.upstream.requests[-1].headers:
            found.setdefault(name.lower(), []).append((name, value))
        return found


def _config(port: int, set_token: bytes) -> str:
    set_value = "Bearer " + set_token.decode()
    return gateway_yaml(
        limits={"header_timeout": "2s", "body_timeout": "2s"},
        upstreams={"app": upstream_to(f"http://127.0.0.1:{port}")},
        routes=[
            route("plain", "app", "/plain", pipeline=[{"jwt": JWT}]),
            route(
                "removed",
                "app",
                "/removed",
                pipeline=[{"headers": {"request": {"remove": ["AUTHORIZATION"]}}}, {"jwt": JWT}],
            ),
            route(
                "set",
                "app",
                "/set",
                pipeline=[
                    {"headers": {"request": {"set": {"authorization": set_value}}}},
                    {"jwt": JWT},
                ],
            ),
            route(
                "edited",
                "app",
                "/edited",
                pipeline=[
                    {"headers": {"request": {"set": {"X-Env": "t"}, "remove": ["X-Debug"]}}},
                    {"jwt": JWT},
                ],
            ),
            route("public", "app", "/public"),
        ],
    )


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[Edge]:
    set_token = token(
        None, claims(sub="gateway", exp=int(time.time()) + 3600), secret=SECRET.encode()
    ).encode()
    async with (
        wire_upstream() as upstream,
        running_gateway(tmp_path, _config(upstream.port, set_token)) as gateway,
    ):
        yield Edge(gateway, upstream, set_token)


def _missing(response: RawResponse) -> bool:
    """The jwt stage's 401 for a request without a bearer token."""
    return response.status == 401 and response.header("www-authenticate") == MISSING


def _invalid(response: RawResponse) -> bool:
    """The jwt stage's 401 for a bearer token that does not verify."""
    challenge = response.header("www-authenticate") or ""
    return response.status == 401 and 'error="invalid_token"' in challenge


# -- read by the connection: spellings, whitespace, copies -----------------------------------


@pytest.mark.parametrize("name", SPELLINGS, ids=[n.decode() for n in SPELLINGS])
async def test_every_spelling_of_the_name_is_checked_and_forwarded(name: bytes, edge: Edge) -> None:
    good = b"Bearer " + _token()
    response = await edge.get("/plain", name + b": " + good)
    assert response.status == 200
    received = edge.received()
    assert received[b"authorization"] == [(name, good)]
    assert received[b"x-user-id"] == [(b"X-User-Id", b"alice")]

    forged = await edge.get("/plain", name + b": Bearer " + _token(secret="t" * 40))
    assert _invalid(forged)
    assert len(edge.upstream.requests) == 1


@pytest.mark.parametrize(
    "after", [b" ", b"\t", b" \t ", b"\t\t"], ids=["space", "tab", "space-tab-space", "tabs"]
)
async def test_whitespace_after_the_token_is_not_part_of_it(after: bytes, edge: Edge) -> None:
    """llhttp keeps trailing whitespace in a value; "k" and "k " are one value, as get_header
    reads them (a token with a space after it would otherwise be refused as malformed)."""
    tok = _token()
    for value in (b"Bearer " + tok + after, b"Bearer " + tok, b"  Bearer " + tok + after):
        response = await edge.get("/plain", b"Authorization: " + value)
        assert response.status == 200, value
        # the upstream's parser trims the whitespace around the value, as the stage does
        assert edge.received()[b"authorization"] == [(b"Authorization", b"Bearer " + tok)]
    blank = await edge.get("/plain", b"Authorization: " + after)
    assert _missing(blank)
    assert len(edge.upstream.requests) == 3


@pytest.mark.parametrize(
    "lines",
    [
        (b"Authorization: Bearer %b", b"Authorization: Bearer %b"),
        (b"authorization: Bearer %b", b"AUTHORIZATION: Basic eA=="),
        (b"Authorization:", b"Authorization: Bearer %b"),
        (b"Authorization: Bearer %b", b"aUTHORIZATION:"),
    ],
    ids=["identical", "other-spelling-and-scheme", "empty-first", "empty-second"],
)
@pytest.mark.parametrize("path", ["/plain", "/public", "/set"])
async def test_a_second_authorization_header_is_400(
    lines: tuple[bytes, bytes], path: str, edge: Edge
) -> None:
    """On every route, before any stage: the stage and the upstream could each read another
    copy (an empty first copy counts: it is a value, not the absence of one)."""
    good = _token()
    response = await edge.get(path, *(line.replace(b"%b", good) for line in lines))
    assert response.status == 400
    assert "Authorization" in json.loads(response.body)["detail"]
    assert edge.upstream.requests == []


# -- a Connection header naming Authorization -------------------------------------------------


@pytest.mark.parametrize(
    "connection",
    [b"authorization", b"Authorization", b"keep-alive, AUTHORIZATION", b"x-other ,authorization"],
)
@pytest.mark.parametrize("first", [True, False], ids=["connection-first", "connection-last"])
async def test_connection_naming_authorization_drops_it_before_the_jwt_stage(
    connection: bytes, first: bool, edge: Edge
) -> None:
    lines = [b"Connection: " + connection, b"Authorization: Bearer " + _token()]
    if not first:
        lines.reverse()
    refused = await edge.get("/plain", *lines)
    assert _missing(refused)  # the token is gone: not checked, not forwarded
    assert edge.upstream.requests == []

    passed = await edge.get("/public", *lines)
    assert passed.status == 200
    assert b"authorization" not in edge.received()


async def test_connection_naming_another_header_keeps_authorization(edge: Edge) -> None:
    good = b"Bearer " + _token()
    response = await edge.get(
        "/plain", b"Connection: X-Other", b"X-Other: o", b"Authorization: " + good
    )
    assert response.status == 200
    received = edge.received()
    assert received[b"authorization"] == [(b"Authorization", good)]
    assert b"x-other" not in received


# -- a headers stage before the jwt stage -----------------------------------------------------


@pytest.mark.parametrize("name", SPELLINGS, ids=[n.decode() for n in SPELLINGS])
async def test_a_headers_stage_removing_authorization_leaves_no_token(
    name: bytes, edge: Edge
) -> None:
    response = await edge.get("/removed", name + b": Bearer " + _token())
    assert _missing(response)
    assert edge.upstream.requests == []


@pytest.mark.parametrize(
    "line",
    [
        None,
        b"Authorization: Bearer garbage",
        b"authorization: Basic eA==",
        b"AUTHORIZATION: Bearer %b",
        b"aUTHORIZATION: Bearer %b",
    ],
    ids=["none", "garbage", "basic", "another-good-token", "another-good-token-odd-case"],
)
async def test_a_headers_stage_setting_authorization_is_what_the_jwt_stage_checks(
    line: bytes | None, edge: Edge
) -> None:
    """The value set replaces the client's (whatever it was, however its name was spelled):
    the stage checks the set token — its subject goes upstream, not the client's."""
    lines = [] if line is None else [line.replace(b"%b", _token())]
    response = await edge.get("/set", *lines)
    assert response.status == 200
    received = edge.received()
    assert received[b"authorization"] == [(b"authorization", b"Bearer " + edge.set_token)]
    assert received[b"x-user-id"] == [(b"X-User-Id", b"gateway")]


async def test_a_headers_stage_editing_other_headers_keeps_the_clients_token(edge: Edge) -> None:
    good = b"Bearer " + _token()
    response = await edge.get("/edited", b"X-Debug: 1", b"Authorization: " + good)
    assert response.status == 200
    received = edge.received()
    assert received[b"authorization"] == [(b"Authorization", good)]
    assert received[b"x-user-id"] == [(b"X-User-Id", b"alice")]
    assert received[b"x-env"] == [(b"X-Env", b"t")]
    assert b"x-debug" not in received

    assert _missing(await edge.get("/edited", b"X-Debug: 1"))
    assert _invalid(await edge.get("/edited", b"Authorization: Bearer " + _token(secret="t" * 40)))
    assert len(edge.upstream.requests) == 1
