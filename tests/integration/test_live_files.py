"""Live files over real sockets: the config and the certificates it references are watched;
rename-saves and Kubernetes-style symlink swaps apply, broken certificates are rejected whole,
and 50 edits under load fail no request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from cryptography import x509

from gateway.app import Gateway
from tests.support.certs import Issued, TestCA
from tests.support.config_builder import gateway_yaml, listener, route
from tests.support.process import async_wait_until
from tests.support.raw import exchange, read_response
from tests.support.tokens import RsaKey, claims, jwks, token


@contextlib.asynccontextmanager
async def watched_gateway(path: Path) -> AsyncIterator[Gateway]:
    gateway = Gateway(str(path), watch=True)
    await gateway.start()
    try:
        assert gateway.watcher is not None
        await asyncio.wait_for(gateway.watcher.ready.wait(), 5)
        yield gateway
    finally:
        await gateway.stop()
        await asyncio.sleep(0)


def _config(tag: str, cert: str = "", key: str = "") -> str:
    """The echo handler answering with X-Tag: `tag`; with `cert`, a listener https too."""
    listeners = [listener()]
    if cert:
        tls = {"certificates": [{"cert": cert, "key": key}]}
        listeners.append(listener(name="https", tls=tls))
    pipeline = [{"headers": {"response": {"set": {"X-Tag": tag}}}}]
    return gateway_yaml(
        listeners=listeners, routes=[route("echo", "internal:echo", pipeline=pipeline)]
    )


def _save(path: Path, text: str) -> None:
    """Save the way editors do: a temporary file renamed over the original."""
    temporary = path.with_name(f".{path.name}.swp")
    temporary.write_text(text)
    os.replace(temporary, path)


async def _tag(gw: Gateway) -> str | None:
    response = await exchange(gw.bound["http"][1], b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    return response.header("x-tag")


async def _until_tag(gw: Gateway, tag: str) -> None:
    for _ in range(200):
        if await _tag(gw) == tag:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"tag {tag} never served")


async def test_rename_save_of_the_config_applies(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(_config("one"))
    async with watched_gateway(path) as gw:
        assert await _tag(gw) == "one"
        _save(path, _config("two"))
        await _until_tag(gw, "two")
        assert gw.last_reload["ok"] is True


async def test_kubernetes_symlink_swap_applies(tmp_path: Path) -> None:
    # the layout a ConfigMap volume has: gateway.yaml -> ..data/gateway.yaml, ..data -> ..v1
    mount = tmp_path / "mount"
    (mount / "..v1").mkdir(parents=True)
    (mount / "..v1" / "gateway.yaml").write_text(_config("v1"))
    (mount / "..data").symlink_to("..v1")
    (mount / "gateway.yaml").symlink_to("..data/gateway.yaml")
    async with watched_gateway(mount / "gateway.yaml") as gw:
        assert await _tag(gw) == "v1"
        (mount / "..v2").mkdir()
        (mount / "..v2" / "gateway.yaml").write_text(_config("v2"))
        (mount / "..data_tmp").symlink_to("..v2")
        os.replace(mount / "..data_tmp", mount / "..data")  # the atomic swap
        await _until_tag(gw, "v2")


def _served(port: int, ca: TestCA) -> x509.Certificate:
    ctx = ssl.create_default_context(cafile=str(ca.path))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def test_certificates_rotate_on_disk_and_a_broken_one_is_refused(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    first: Issued = ca.issue("server", dns=("localhost",))
    path = tmp_path / "gateway.yaml"
    path.write_text(_config("tls", "server.crt", "server.key"))
    async with watched_gateway(path) as gw:
        port = gw.bound["https"][1]
        serial = (await asyncio.to_thread(_served, port, ca)).serial_number
        # a client keeps a connection open across the rotation
        ctx = ssl.create_default_context(cafile=str(ca.path))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        # rotate: a new certificate and key written over the old files
        renewed = ca.issue("renewed", dns=("localhost",))
        _save(first.key, renewed.key.read_text())
        _save(first.cert, renewed.cert.read_text())
        new_serial = x509.load_pem_x509_certificate(renewed.cert.read_bytes()).serial_number

        async def rotated() -> bool:
            return (await asyncio.to_thread(_served, port, ca)).serial_number == new_serial

        for _ in range(200):
            if await rotated():
                break
            await asyncio.sleep(0.025)
        assert (await asyncio.to_thread(_served, port, ca)).serial_number != serial
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
        writer.close()

        # a broken certificate on disk: rejected, the renewed one keeps serving
        failures = gw.metrics.config_reloads_total.labels("failure")
        before = failures.value
        _save(first.cert, "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        await async_wait_until(lambda: failures.value > before, within=5, what="rejection")
        assert gw.last_reload["ok"] is False
        assert "listeners[1].tls.certificates[0].cert" in gw.last_reload["error"]
        assert gw.metrics.config_last_reload_success.labels().value == 0
        assert (await asyncio.to_thread(_served, port, ca)).serial_number == new_serial
        assert gw.admin is not None
        url = f"http://127.0.0.1:{gw.admin.port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/admin/config") as r:
                info = await r.json()
            async with session.get(f"{url}/metrics") as r:
                metrics = await r.text()
        assert info["last_reload"]["ok"] is False
        assert "not a PEM certificate" in info["last_reload"]["error"]
        assert 'gateway_tls_certificate_not_after_seconds{name="https:server.crt"}' in metrics


async def test_fifty_edits_under_load_fail_no_request(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(_config("0"))
    async with watched_gateway(path) as gw:
        port = gw.bound["http"][1]
        stop = asyncio.Event()
        outcomes: list[int] = []

        async def client() -> None:
            async with aiohttp.ClientSession() as session:
                while not stop.is_set():
                    async with session.get(f"http://127.0.0.1:{port}/") as r:
                        await r.read()
                        outcomes.append(r.status)

        clients = [asyncio.create_task(client()) for _ in range(8)]
        try:
            for i in range(1, 51):
                _save(path, _config(str(i)))
                await _until_tag(gw, str(i))
        finally:
            stop.set()
            await asyncio.gather(*clients)
        assert len(outcomes) > 200
        assert set(outcomes) == {200}
        reloads = gw.metrics.config_reloads_total.labels("success").value
        assert reloads >= 50
        assert json.loads(json.dumps(gw.last_reload))["ok"] is True


async def test_client_ca_and_jwks_files_rotate_live(tmp_path: Path) -> None:
    old_ca, new_ca = TestCA(tmp_path, "old"), TestCA(tmp_path, "new")
    old_ca.issue("server", dns=("localhost",))
    (tmp_path / "clients.crt").write_bytes(old_ca.path.read_bytes())
    old_client = old_ca.issue("old-client", uris=("spiffe://corp/a",), client=True)
    new_client = new_ca.issue("new-client", uris=("spiffe://corp/a",), client=True)
    old_key, new_key = RsaKey("old"), RsaKey("new")
    (tmp_path / "jwks.json").write_bytes(jwks(old_key))
    path = tmp_path / "gateway.yaml"
    tls = {
        "certificates": [{"cert": "server.crt", "key": "server.key"}],
        "client_ca": "clients.crt",
    }
    pipeline = [{"mtls": {}}, {"jwt": {"algorithms": ["RS256"], "jwks_file": "jwks.json"}}]
    path.write_text(
        gateway_yaml(
            listeners=[listener(name="https", tls=tls)],
            routes=[route("secure", "internal:echo", pipeline=pipeline)],
        )
    )

    async def status(client: Issued, key: RsaKey) -> int | str:
        ctx = ssl.create_default_context(cafile=str(old_ca.path))
        ctx.load_cert_chain(str(client.cert), str(client.key))
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", gw.bound["https"][1], ssl=ctx, server_hostname="localhost"
            )
            tok = token(key, claims(aud=None, iss=None))
            writer.write(
                f"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {tok}\r\n\r\n".encode()
            )
            response = await asyncio.wait_for(read_response(reader), 5)
            writer.close()
            return response.status
        except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
            return "refused"

    async with watched_gateway(path) as gw:
        assert await status(old_client, old_key) == 200
        assert await status(new_client, old_key) == "refused"
        _save(tmp_path / "clients.crt", new_ca.path.read_text())
        _save(tmp_path / "jwks.json", jwks(new_key).decode())
        for _ in range(200):
            if await status(new_client, new_key) == 200:
                break
            await asyncio.sleep(0.025)
        assert await status(new_client, new_key) == 200
        assert await status(old_client, new_key) == "refused"
        assert await status(new_client, old_key) == 401
