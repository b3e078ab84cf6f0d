"""Hop-by-hop headers never cross the gateway, either way, over real sockets (RFC 9110 §7.6.1,
SPEC §3): each of them alone and named in `Connection`, and any header `Connection` names.

Each hop-by-hop header is sent with its name in an odd case (`kEEP-aLIVE`): the gateway forwards
the headers it keeps byte for byte, so a forwarded copy arrives spelled that way, and is told
apart from the framing (`Transfer-Encoding: chunked`, `Connection: close`) the gateway writes
itself.  The far side is a socket server that records the header lines as they arrived
(tests/support/wire_upstream.py) or a raw client reading the response's lines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.http.headers import HOP_BY_HOP
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import port_of, running_gateway
from tests.support.raw import exchange
from tests.support.wire_upstream import WireUpstream, parse_head, wire_upstream

#: every hop-by-hop name (SPEC §3) with a value it could carry
HOP_VALUES: dict[str, bytes] = {
    "connection": b"keep-alive",
    "keep-alive": b"timeout=5, max=100",
    "proxy-connection": b"keep-alive",
    "te": b"trailers",
    "trailer": b"X-Hop-Trailer",
    "transfer-encoding": b"chunked",
    "upgrade": b"hop-protocol/1",
    "proxy-authenticate": b'Basic realm="hop"',
    "proxy-authorization": b"Basic aG9wOmhvcA==",
}

#: the only lines of these names that may arrive: the ones the gateway writes itself, as it
#: spells them (its own framing and connection management), at most one each
GATEWAY_OWN: dict[str, set[tuple[bytes, bytes]]] = {
    "connection": {(b"Connection", b"close"), (b"Connection", b"keep-alive")},
    "transfer-encoding": {(b"Transfer-Encoding", b"chunked")},
}

ARBITRARY = "x-hop-custom"
#: the same, named by a second Connection line (a header's lines are one comma-joined list)
ARBITRARY_SECOND_LINE = "x-hop-custom-second-line"


def odd_case(name: str) -> bytes:
    """`keep-alive` -> `kEEP-aLIVE`: a spelling neither the gateway nor a library writes."""
    return "-".join(part.capitalize() for part in name.split("-")).swapcase().encode()


def hop_lines(name: str, named: bool) -> list[tuple[bytes, bytes]]:
    """The header lines that carry `name`, named in a Connection header or not."""
    if name == ARBITRARY:
        # an end-to-end name, hop-by-hop only because Connection names it
        return [(b"Connection", odd_case(name)), (odd_case(name), b"secret")]
    if name == ARBITRARY_SECOND_LINE:
        custom = odd_case(ARBITRARY)
        first = b"Keep-Alive, X-Not-Sent"
        return [(b"Connection", first), (b"Connection", custom), (custom, b"secret")]
    if name == "connection":
        value = b"keep-alive, Connection" if named else HOP_VALUES[name]
        return [(odd_case(name), value)]
    lines = [(odd_case(name), HOP_VALUES[name])]
    if named:
        lines.append((b"Connection", odd_case(name)))
    return lines


CASES = [
    pytest.param(name, named, id=f"{name}-{'named' if named else 'alone'}")
    for name in HOP_VALUES
    for named in (False, True)
] + [
    pytest.param(ARBITRARY, True, id=f"{ARBITRARY}-named"),
    pytest.param(ARBITRARY_SECOND_LINE, True, id=f"{ARBITRARY}-named-on-a-second-line"),
]


def assert_removed(name: str, headers: list[tuple[bytes, bytes]]) -> None:
    if name == ARBITRARY_SECOND_LINE:
        name = ARBITRARY
    arrived = [(n, v) for n, v in headers if n.lower() == name.encode()]
    allowed = GATEWAY_OWN.get(name, set())
    assert all(line in allowed for line in arrived), arrived
    assert len(arrived) <= 1, arrived
    # nor does any Connection header the sender wrote, whatever it named
    assert all(line in GATEWAY_OWN["connection"] for line in _named(headers, b"connection"))


def _named(headers: list[tuple[bytes, bytes]], low: bytes) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in headers if n.lower() == low]


@pytest.fixture
async def proxied(tmp_path: Path) -> AsyncIterator[tuple[WireUpstream, Gateway]]:
    """A gateway in front of a wire upstream, every path to it."""
    async with wire_upstream() as wire:
        config = gateway_yaml(
            upstreams={"app": upstream_to(wire.url)}, routes=[route("app", "app")]
        )
        async with running_gateway(tmp_path, config) as gw:
            yield wire, gw


def test_the_cases_cover_every_name_the_gateway_treats_as_hop_by_hop() -> None:
    assert {name.encode() for name in HOP_VALUES} == HOP_BY_HOP


@pytest.mark.parametrize(("name", "named"), CASES)
async def test_client_hop_by_hop_headers_never_reach_the_upstream(
    proxied: tuple[WireUpstream, Gateway], name: str, named: bool
) -> None:
    upstream, gw = proxied
    lines = b"".join(b"%b: %b\r\n" % line for line in hop_lines(name, named))
    if name == "transfer-encoding":
        request = b"POST /hop HTTP/1.1\r\nHost: a\r\n%bX-Kept: yes\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    else:
        request = b"GET /hop HTTP/1.1\r\nHost: a\r\n%bX-Kept: yes\r\n\r\n"
    response = await exchange(port_of(gw), request % lines)
    assert response.status == 200, response.body
    [seen] = upstream.requests
    assert seen.named("x-kept") == [(b"X-Kept", b"yes")]  # the end-to-end header next to it
    assert_removed(name, seen.headers)
    if name == "transfer-encoding":
        assert seen.body == b"hello"  # re-framed by the gateway, not passed through


@pytest.mark.parametrize(("name", "named"), CASES)
async def test_upstream_hop_by_hop_headers_never_reach_the_client(
    proxied: tuple[WireUpstream, Gateway], name: str, named: bool
) -> None:
    upstream, gw = proxied
    lines = b"".join(b"%b: %b\r\n" % line for line in hop_lines(name, named))
    if name == "transfer-encoding":
        framing, body = b"", b"2\r\nok\r\n0\r\n\r\n"
    else:
        framing, body = b"Content-Length: 2\r\n", b"ok"
    upstream.response = b"HTTP/1.1 200 OK\r\n%b%bX-Kept: yes\r\n\r\n%b" % (lines, framing, body)
    response = await exchange(port_of(gw), b"GET /hop HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (response.status, response.body) == (200, b"ok")
    _, headers = parse_head(response.raw_head[:-4])
    assert _named(headers, b"x-kept") == [(b"X-Kept", b"yes")]
    assert_removed(name, headers)
