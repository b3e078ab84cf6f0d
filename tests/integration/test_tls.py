"""TLS termination and per-route mTLS over real TLS sockets, certificates made at test time."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from cryptography import x509

from gateway.app import Gateway
from tests.integration.conftest import Seen
from tests.support.certs import Issued, TestCA
from tests.support.config_builder import gateway_yaml, listener, route, upstream_to
from tests.support.gateway import port_of, running_gateway, write_config
from tests.support.raw import RawResponse, read_response


@dataclass
class Pki:
    ca: TestCA
    other: TestCA
    server: Issued
    second: Issued
    client: Issued


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = TestCA(tmp_path, "ca")
    return Pki(
        ca=ca,
        other=TestCA(tmp_path, "other"),
        server=ca.issue("server", dns=("localhost",), ips=("127.0.0.1",)),
        second=ca.issue("second", dns=("api.test", "*.apps.test")),
        client=ca.issue(
            "client", uris=("spiffe://corp/frontend",), dns=("front.corp",), client=True
        ),
    )


def _config(
    pki: Pki,
    port: int,
    *,
    min_version: str = "1.2",
    forward: str = "rfc9440",
    server: Issued | None = None,
    mtls: bool = True,
) -> str:
    """Listeners https (`server`'s certificate by default, then `pki.second`) and http; route
    /secure behind an mtls stage (without `mtls`: no client CA, and a headers stage instead)."""
    server = server or pki.server
    tls: dict[str, Any] = {
        "certificates": [
            {"cert": server.cert, "key": server.key},
            {"cert": pki.second.cert, "key": pki.second.key},
        ]
    }
    if mtls:
        tls["client_ca"] = pki.ca.path
    tls["min_version"] = min_version
    stage = {"mtls": {"allowed_sans": ["spiffe://corp/*"], "forward": forward}}
    return gateway_yaml(
        listeners=[listener(name="https", tls=tls), listener()],
        limits={"header_timeout": "1s"},
        upstreams={"app": upstream_to(f"http://127.0.0.1:{port}")},
        routes=[
            route("secure", "app", "/secure", pipeline=[stage if mtls else {"headers": {}}]),
            route("open", "app"),
        ],
    )


@pytest.fixture
async def edge(
    tmp_path: Path, pki: Pki, upstream: tuple[TestServer, Seen]
) -> AsyncIterator[Gateway]:
    server, _ = upstream
    assert server.port is not None
    async with running_gateway(tmp_path, _config(pki, server.port)) as gateway:
        yield gateway


def _client(pki: Pki, cert: Issued | None = None, trust: TestCA | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str((trust or pki.ca).path))
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


async def _get(
    port: int,
    ctx: ssl.SSLContext,
    path: str = "/",
    *,
    server_name: str = "localhost",
    headers: str = "",
) -> tuple[RawResponse, x509.Certificate]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=server_name), 5
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\n{headers}\r\n".encode())
    response = await asyncio.wait_for(read_response(reader), 5)
    writer.close()
    return response, x509.load_der_x509_certificate(der)


def _sent(seen: Seen) -> dict[str, str]:
    return {n.decode().lower(): v.decode() for n, v in seen.requests[-1]["headers"]}


def _sans(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ext.get_values_for_type(x509.DNSName)


async def test_https_with_sni_and_a_default_certificate(edge: Gateway, pki: Pki) -> None:
    port = port_of(edge, "https")
    response, cert = await _get(port, _client(pki))
    assert response.status == 200
    assert _sans(cert) == ["localhost"]
    _, cert = await _get(port, _client(pki), server_name="api.test")
    assert _sans(cert) == ["api.test", "*.apps.test"]
    _, cert = await _get(port, _client(pki), server_name="x.apps.test")
    assert _sans(cert) == ["api.test", "*.apps.test"]
    # a name no certificate serves gets the default one (and the client refuses it)
    with pytest.raises(ssl.SSLCertVerificationError):
        await _get(port, _client(pki), server_name="unknown.test")


async def test_forwarded_proto_is_https(
    edge: Gateway, pki: Pki, upstream: tuple[TestServer, Seen]
) -> None:
    await _get(port_of(edge, "https"), _client(pki))
    assert _sent(upstream[1])["x-forwarded-proto"] == "https"


async def test_mtls_route_needs_an_allowed_certificate(
    edge: Gateway, pki: Pki, upstream: tuple[TestServer, Seen]
) -> None:
    port = port_of(edge, "https")
    response, _ = await _get(port, _client(pki), "/secure")
    assert response.status == 403
    assert json.loads(response.body)["code"] == "client_certificate_required"
    plain = pki.ca.issue("plain", dns=("someone.corp",), client=True)
    response, _ = await _get(port, _client(pki, plain), "/secure")
    assert response.status == 403
    assert json.loads(response.body)["code"] == "client_certificate_forbidden"
    # the same host, another route: no certificate needed
    response, _ = await _get(port, _client(pki), "/public")
    assert response.status == 200


async def test_verified_certificate_is_forwarded_and_forgeries_are_dropped(
    edge: Gateway, pki: Pki, upstream: tuple[TestServer, Seen]
) -> None:
    port = port_of(edge, "https")
    forged = "Client-Cert: :Zm9yZ2Vk:\r\nX-Forwarded-Client-Cert: Hash=forged\r\n"
    response, _ = await _get(port, _client(pki, pki.client), "/secure", headers=forged)
    assert response.status == 200
    sent = _sent(upstream[1])
    der = x509.load_pem_x509_certificate(pki.client.cert.read_bytes()).public_bytes(
        __import__(
            "cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]
        ).Encoding.DER
    )
    assert sent["client-cert"] == ":" + base64.b64encode(der).decode() + ":"
    assert "x-forwarded-client-cert" not in sent
    # on a route without mtls, a client's copies go nowhere either
    await _get(port, _client(pki, pki.client), "/public", headers=forged)
    sent = _sent(upstream[1])
    assert "client-cert" not in sent
    assert "x-forwarded-client-cert" not in sent


async def test_plain_http_on_an_mtls_route_is_refused(edge: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(edge, "http"))
    writer.write(b"GET /secure HTTP/1.1\r\nHost: a\r\n\r\n")
    response = await asyncio.wait_for(read_response(reader), 5)
    writer.close()
    assert response.status == 403
    assert json.loads(response.body)["code"] == "client_certificate_required"


@pytest.mark.parametrize("which", ["other_ca", "expired"])
async def test_bad_client_certificates_fail_the_handshake(
    edge: Gateway, pki: Pki, which: str
) -> None:
    if which == "other_ca":
        cert = pki.other.issue("stranger", uris=("spiffe://corp/frontend",), client=True)
    else:
        cert = pki.ca.issue("old", uris=("spiffe://corp/frontend",), client=True, expired=True)
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        # TLS 1.3: the server's refusal arrives with the first read
        await _get(port_of(edge, "https"), _client(pki, cert), "/secure")


async def test_min_version_13_refuses_a_tls12_client(
    tmp_path: Path, pki: Pki, upstream: tuple[TestServer, Seen]
) -> None:
    server, _ = upstream
    async with running_gateway(tmp_path, _config(pki, server.port or 0, min_version="1.3")) as gw:
        ctx = _client(pki)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        # the server ends the handshake: an alert or a reset, depending on timing
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _get(port_of(gw, "https"), ctx)
        ctx = _client(pki)
        response, _ = await _get(port_of(gw, "https"), ctx)
        assert response.status == 200


async def test_xfcc_forwarding(tmp_path: Path, pki: Pki, upstream: tuple[TestServer, Seen]) -> None:
    server, seen = upstream
    async with running_gateway(tmp_path, _config(pki, server.port or 0, forward="xfcc")) as gw:
        response, _ = await _get(port_of(gw, "https"), _client(pki, pki.client), "/secure")
        assert response.status == 200
    xfcc = _sent(seen)["x-forwarded-client-cert"]
    assert xfcc.startswith("Hash=")
    assert 'Subject="CN=client,O=gateway development"' in xfcc
    assert "URI=spiffe://corp/frontend" in xfcc
    assert "DNS=front.corp" in xfcc


async def test_a_silent_client_is_dropped_after_header_timeout(edge: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(edge, "https"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # never sent a ClientHello
    assert 0.9 <= loop.time() - started < 3
    writer.close()


async def test_a_new_certificate_reaches_new_handshakes_only(
    tmp_path: Path, edge: Gateway, pki: Pki, upstream: tuple[TestServer, Seen]
) -> None:
    port = port_of(edge, "https")
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=_client(pki), server_hostname="localhost"
    )
    renewed = pki.ca.issue("renewed", dns=("localhost", "renewed.test"), ips=("127.0.0.1",))
    server, _ = upstream
    write_config(tmp_path, _config(pki, server.port or 0, server=renewed))
    result = await edge.reload()
    assert result["ok"], result
    _, cert = await _get(port, _client(pki))
    assert _sans(cert) == ["localhost", "renewed.test"]
    # the connection opened before the reload carries on with what it negotiated
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
    writer.close()


async def test_mozilla_intermediate_profile(edge: Gateway) -> None:
    """sslyze's check against Mozilla's "intermediate" configuration (TLS versions, cipher
    suites, curves, certificate); the only finding allowed is that the test CA is not one of
    the public roots its path validation trusts."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sslyze",
        "--mozilla_config=intermediate",
        f"localhost:{port_of(edge, 'https')}{{127.0.0.1}}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    report = out.decode().split("COMPLIANCE AGAINST TLS CONFIGURATION")[-1]
    issues = [line.strip()[2:].split(":")[0] for line in report.splitlines() if "* " in line]
    assert "Checking results against Mozilla" in report, out.decode()[-2000:]
    assert issues in ([], ["certificate_path_validation"]), report


async def test_min_version_or_client_ca_changes_need_a_restart(
    tmp_path: Path, edge: Gateway, pki: Pki, upstream: tuple[TestServer, Seen]
) -> None:
    server, _ = upstream
    for changed in (
        _config(pki, server.port or 0, min_version="1.3"),
        _config(pki, server.port or 0, mtls=False),
    ):
        write_config(tmp_path, changed)
        result = await edge.reload()
        assert result["ok"] is False
        assert "restart" in result["error"]
    # the certificates themselves apply live (test_a_new_certificate_reaches_new_handshakes_only)
