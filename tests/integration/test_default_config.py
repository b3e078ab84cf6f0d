"""The embedded default config does what the README's quick tour says."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

from tests.support.certs import ensure_dev_certificates
from tests.support.gateway import port_of, running_gateway
from tests.support.raw import exchange, read_response

REPO = Path(__file__).resolve().parents[2]


async def test_quick_tour(tmp_path: Path) -> None:
    certs = ensure_dev_certificates()
    text = (REPO / "config" / "gateway.yaml").read_text().replace("../certs/", f"{certs}/")
    for bind in ('"0.0.0.0:8080"', '"0.0.0.0:8443"', '"127.0.0.1:9901"'):
        text = text.replace(bind, '"127.0.0.1:0"')
    # the status listener's default, inside its ${GATEWAY_STATUS_BIND:-...}
    text = text.replace(":-127.0.0.1:9902}", ":-127.0.0.1:0}")
    text = text.replace("access_log:\n  enabled: true", "access_log:\n  enabled: false")
    async with running_gateway(tmp_path, text) as gw:
        port = port_of(gw)
        echo = await exchange(port, b"GET /echo/hello HTTP/1.1\r\nHost: a\r\n\r\n")
        assert echo.status == 200
        assert echo.header("x-frame-options") == "DENY"
        assert json.loads(echo.body)["headers"]["x-env"] == "dev"
        statuses = []
        for _ in range(6):
            response = await exchange(port, b"GET /limited HTTP/1.1\r\nHost: a\r\n\r\n")
            statuses.append(response.status)
        assert statuses == [200] * 5 + [429]
        assert response.header("retry-after") is not None
        assert response.header("ratelimit-policy") == '"per-client";q=5;w=60'
        # the idempotent payments route: one execution, then replays
        post = b"POST /payments HTTP/1.1\r\nHost: a\r\nIdempotency-Key: pay-0001\r\n"
        first = await exchange(port, post + b"Content-Length: 9\r\n\r\namount=10")
        again = await exchange(port, post + b"Content-Length: 9\r\n\r\namount=10")
        changed = await exchange(port, post + b"Content-Length: 9\r\n\r\namount=99")
        assert (first.status, again.status, changed.status) == (200, 200, 422)
        assert again.header("idempotent-replayed") == "true"
        assert again.body == first.body
        # the HTTPS listener: the mtls route with the development client certificate
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        ctx.load_cert_chain(str(certs / "client.crt"), str(certs / "client.key"))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port_of(gw, "https"), ssl=ctx, server_hostname="localhost"
        )
        writer.write(b"GET /mtls/hello HTTP/1.1\r\nHost: localhost\r\n\r\n")
        mtls = await asyncio.wait_for(read_response(reader), 5)
        writer.close()
        assert mtls.status == 200
        assert json.loads(mtls.body)["headers"]["client-cert"].startswith(":")
        # the status listener: probes and metrics, not the admin API
        assert gw.status is not None
        readyz = await exchange(gw.status.port, b"GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (readyz.status, json.loads(readyz.body)) == (200, {"state": "ready"})
        routes = await exchange(gw.status.port, b"GET /admin/routes HTTP/1.1\r\nHost: a\r\n\r\n")
        assert routes.status == 404
