"""The embedded default config does what the README's quick tour says."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.gateway import port_of, running_gateway
from tests.support.raw import exchange

REPO = Path(__file__).resolve().parents[2]


async def test_quick_tour(tmp_path: Path) -> None:
    text = (REPO / "config" / "gateway.yaml").read_text()
    text = text.replace('"0.0.0.0:8080"', '"127.0.0.1:0"').replace(
        '"127.0.0.1:9901"', '"127.0.0.1:0"'
    )
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
