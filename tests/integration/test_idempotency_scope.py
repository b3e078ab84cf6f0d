"""Idempotency records are scoped to the client (issue 11, defect 5), over real sockets.

Two clients send the same key with the same body: with a scope (the JWT's subject by default, a
certificate's SANs, a claim, a header, the client's address) each gets its own execution,
counted at the upstream, and its own response (its own cookie); another client's key is never
a 422.  `scope: none` keeps the shared key space, where the second client gets the first
client's response.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.certs import Issued, TestCA
from tests.support.config_builder import listener
from tests.support.faulty import faulty_upstreams
from tests.support.gateway import port_of, running_gateway
from tests.support.idempotency import code, detail, idempotency_config, keyed_post, post
from tests.support.raw import RawResponse, close_writer, read_response
from tests.support.tokens import claims, token

JWT_SECRET = "jwt-secret-for-idempotency-scope-tests-0123"
JWT = [{"jwt": {"algorithms": ["HS256"], "secret": JWT_SECRET}}]
TRUST_LOOPBACK = ["127.0.0.1/32"]
#: the stages before the idempotency stage
Stages = list[dict[str, Any]]
ADDRESSES = {"alice": "203.0.113.1", "bob": "203.0.113.2"}


def _bearer(**payload: str) -> str:
    signed = token(None, claims(**payload), secret=JWT_SECRET.encode())
    return f"Authorization: Bearer {signed}\r\n"


#: how a client called `name` identifies itself to the gateway, by what the scope reads
IDENTIFY: dict[str, Callable[[str], str]] = {
    "sub": lambda name: _bearer(sub=name),
    "tenant claim": lambda name: _bearer(sub="one-user", tenant=name),
    "X-Tenant": lambda name: f"X-Tenant: {name}\r\n",
    "address": lambda name: f"X-Forwarded-For: {ADDRESSES[name]}\r\n",
}

SCOPES = [
    # (pipeline before idempotency, stage, how clients identify, effective scope, shared)
    (JWT, {}, "sub", "jwt:sub", False),
    (JWT, {"scope": "jwt:tenant"}, "tenant claim", "jwt:tenant", False),
    ([], {"scope": "header:X-Tenant"}, "X-Tenant", "header:x-tenant", False),
    ([], {"scope": "client_ip"}, "address", "client_ip", False),
    (JWT, {"scope": "none"}, "sub", "none", True),
]


@pytest.mark.parametrize(
    ("before", "stage", "identify", "effective", "shared"),
    SCOPES,
    ids=["auto-is-jwt-sub", "jwt-claim", "header", "client-ip", "none-is-shared"],
)
async def test_two_clients_one_key(
    tmp_path: Path,
    before: Stages,
    stage: dict[str, str],
    identify: str,
    effective: str,
    shared: bool,
) -> None:
    async with (
        faulty_upstreams("up") as [up],
        running_gateway(
            tmp_path,
            idempotency_config([up.url], stage, before=before, trusted_proxies=TRUST_LOOPBACK),
        ) as gw,
    ):
        port = port_of(gw)
        seen: dict[str, list[RawResponse]] = {}
        for name in ("alice", "bob"):
            headers = IDENTIFY[identify](name) + f"X-Test-Id: {name}\r\n"
            seen[name] = [await post(port, "same-key", headers=headers) for _ in range(2)]
        # alice's key, probed by bob with another body: 422 only in a shared key space
        alice = IDENTIFY[identify]("alice") + "X-Test-Id: alice-probe\r\n"
        assert (await post(port, "probe", headers=alice)).status == 200
        bob = IDENTIFY[identify]("bob") + "X-Test-Id: bob-probe\r\n"
        probe = await post(port, "probe", body=b"amount=99", headers=bob)
        [route] = gw.routes_info()
        if shared:
            assert up.executions == {"alice": 1, "alice-probe": 1}
            # bob gets alice's stored response, her session cookie included
            assert [r.header("set-cookie") for r in seen["bob"]] == ["session=alice"] * 2
            assert (probe.status, code(probe)) == (422, "idempotency_key_reused")
        else:
            assert up.executions == {"alice": 1, "bob": 1, "alice-probe": 1, "bob-probe": 1}
            for name, (first, repeat) in seen.items():
                assert first.header("idempotent-replayed") is None
                assert repeat.header("idempotent-replayed") == "true"
                assert [first.header("set-cookie"), repeat.header("set-cookie")] == [
                    f"session={name}"
                ] * 2
            assert probe.status == 200
        # /admin/routes shows the scope in effect
        assert route["stages"][-1] == {
            "name": "idempotency",
            "kind": "idempotency",
            "scope": effective,
        }


@pytest.mark.parametrize(
    ("before", "stage", "identify", "missing"),
    [
        ([], {"scope": "header:X-Tenant"}, lambda: "", "x-tenant header"),
        ([], {"scope": "header:X-Tenant"}, lambda: "X-Tenant: \r\n", "x-tenant header"),
        (JWT, {"scope": "jwt:tenant"}, lambda: _bearer(sub="alice"), "tenant claim"),
    ],
    ids=["header-absent", "header-empty", "claim-absent"],
)
async def test_a_request_without_its_scope_is_refused(
    tmp_path: Path,
    before: Stages,
    stage: dict[str, str],
    identify: Callable[[], str],
    missing: str,
) -> None:
    headers = identify()
    async with (
        faulty_upstreams("up") as [up],
        running_gateway(tmp_path, idempotency_config([up.url], stage, before=before)) as gw,
    ):
        response = await post(port_of(gw), "k", headers=headers)
        # without a key the scope does not matter: required: true answers first
        unkeyed = await post(port_of(gw), None, headers=headers)
    assert (response.status, code(response)) == (400, "idempotency_key_invalid")
    assert missing in detail(response)
    assert (unkeyed.status, code(unkeyed)) == (400, "idempotency_key_missing")
    assert up.total == 0


async def _tls_post(port: int, client: ssl.SSLContext, name: str) -> RawResponse:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost"), 5
    )
    try:
        writer.write(keyed_post("same-key", headers=f"X-Test-Id: {name}\r\n"))
        return await asyncio.wait_for(read_response(reader), 5)
    finally:
        await close_writer(writer)


def _client(ca: TestCA, issued: Issued) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.path))
    context.load_cert_chain(str(issued.cert), str(issued.key))
    return context


async def test_two_client_certificates_one_key(tmp_path: Path) -> None:
    ca = TestCA(tmp_path, "ca")
    server = ca.issue("server", dns=("localhost",), ips=("127.0.0.1",))
    clients = {
        name: _client(ca, ca.issue(name, uris=(f"spiffe://corp/{name}",), client=True))
        for name in ("alice", "bob")
    }
    tls = {"certificates": [{"cert": server.cert, "key": server.key}], "client_ca": ca.path}
    async with (
        faulty_upstreams("up") as [up],
        running_gateway(
            tmp_path,
            idempotency_config(
                [up.url], before=[{"mtls": {}}], listeners=[listener(name="https", tls=tls)]
            ),
        ) as gw,
    ):
        port = port_of(gw, "https")
        seen = {
            name: [await _tls_post(port, context, name) for _ in range(2)]
            for name, context in clients.items()
        }
        assert up.executions == {"alice": 1, "bob": 1}
        for name, (first, repeat) in seen.items():
            assert first.header("set-cookie") == repeat.header("set-cookie") == f"session={name}"
            assert repeat.header("idempotent-replayed") == "true"
        assert gw.routes_info()[0]["stages"][-1]["scope"] == "mtls:san"
