"""The jwt stage over real sockets: JWKS from a file and from a URL (with key rotation, and
unusable keys skipped), 401 answers, misspelled tokens refused, claims forwarded, spoofed claim
headers dropped, rate limits keyed by a claim."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from gateway.stages.jwt import JwtStage
from tests.integration.conftest import Seen
from tests.support.gateway import port_of, running_gateway, write_config
from tests.support.process import async_wait_until
from tests.support.raw import RawResponse, exchange
from tests.support.tokens import (
    MISSPELLINGS,
    UNUSABLE_KEYS,
    URL_SAFE_FILLER,
    EcKey,
    RsaKey,
    claims,
    jwks,
    jwt_config,
    token,
)

#: every kind of key that cannot verify our tokens, in one JWKS beside the good ones
JUNK = [entry for _, entry, _ in UNUSABLE_KEYS]


#: the JWKS file the test writes beside the config
JWKS_FILE = {"jwks_file": "jwks.json"}


def _config(port: int, source: Mapping[str, Any], after: Sequence[Mapping[str, Any]] = ()) -> str:
    return jwt_config(source, upstream_port=port, after=after)


async def _get(port: int, tok: str | None = None, headers: str = "") -> RawResponse:
    auth = f"Authorization: Bearer {tok}\r\n" if tok else ""
    return await exchange(port, f"GET /x HTTP/1.1\r\nHost: a\r\n{auth}{headers}\r\n".encode())


def _sent(seen: Seen) -> dict[str, str]:
    return {n.decode().lower(): v.decode() for n, v in seen.requests[-1]["headers"]}


async def test_jwks_file_claims_forwarded_and_spoofs_dropped(
    tmp_path: Path, upstream: tuple[TestServer, Seen]
) -> None:
    server, seen = upstream
    key = RsaKey("k1")
    (tmp_path / "jwks.json").write_bytes(jwks(key))
    config = _config(server.port or 0, JWKS_FILE)
    async with running_gateway(tmp_path, config) as gw:
        port = port_of(gw)
        spoof = "X-User-Id: root\r\nX-Scope: admin\r\n"
        ok = await _get(port, token(key, claims(scope=["read", "write"])), spoof)
        assert ok.status == 200
        sent = _sent(seen)
        assert sent["x-user-id"] == "alice"
        assert sent["x-scope"] == '["read","write"]'
        assert sent["authorization"].startswith("Bearer ")  # the token itself goes on

        missing = await _get(port, headers=spoof)
        assert missing.status == 401
        assert missing.header("www-authenticate") == 'Bearer realm="gateway"'
        assert json.loads(missing.body)["code"] == "unauthenticated"
        expired = await _get(port, token(key, claims(exp=1)))
        assert expired.status == 401
        assert 'error="invalid_token"' in (expired.header("www-authenticate") or "")
        assert "expired" in json.loads(expired.body)["detail"]
        assert len(seen.requests) == 1
        assert gw.admin is not None
        text = gw.metrics_text()
        assert 'gateway_jwt_total{route="api",result="ok"} 1' in text
        assert 'gateway_jwt_total{route="api",result="missing"} 1' in text
        assert 'gateway_jwt_total{route="api",result="expired"} 1' in text


@asynccontextmanager
async def jwks_server(
    document: list[bytes], gate: asyncio.Event | None = None
) -> AsyncIterator[tuple[str, list[int]]]:
    """Serves `document[0]`; while `gate` is clear, each fetch waits for it once counted."""
    fetches: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        fetches.append(1)
        if gate is not None:
            await gate.wait()
        return web.Response(body=document[0], content_type="application/json")

    app = web.Application()
    app.router.add_get("/jwks.json", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}/jwks.json", fetches
    finally:
        await server.close()


async def test_jwks_url_with_key_rotation(
    tmp_path: Path, upstream: tuple[TestServer, Seen], waits_outside_a_task: list[str]
) -> None:
    """A new key is fetched when a token names it, at most once per interval — and the
    request that waits for the fetch, driven without a task (gateway.core.waiter), gets one
    first (the fetch's `wait_for` needs it from Python 3.12 on)."""
    server, _ = upstream
    old, new = RsaKey("2025"), EcKey("2026")
    document = [jwks(old)]
    async with jwks_server(document) as (url, fetches):
        config = _config(server.port or 0, {"jwks_url": url})
        async with running_gateway(tmp_path, config) as gw:
            port = port_of(gw)
            assert (await _get(port, token(old, claims()))).status == 200
            assert (await _get(port, token(old, claims()))).status == 200  # cached
            before = len(fetches)
            document[0] = jwks(old, new)  # the issuer publishes its next key
            assert (await _get(port, token(new, claims()))).status == 200
            assert len(fetches) == before + 1
            # an unknown kid does not refetch again within the minimum interval
            assert (await _get(port, token(new, claims(), kid="nope"))).status == 401
            assert len(fetches) == before + 1
    assert waits_outside_a_task == []


async def test_the_token_cache_forgets_the_least_recently_used_token(
    tmp_path: Path, upstream: tuple[TestServer, Seen]
) -> None:
    """A full cache drops the token used longest ago, not the one verified first: after the
    issuer drops its key, a cached token still passes and an evicted one, verified again, no
    longer can."""
    server, _ = upstream
    old, new = RsaKey("2025"), RsaKey("2026")
    first, second, third, fourth = (token(old, claims(sub=s)) for s in ("a", "b", "c", "d"))
    document = [jwks(old)]
    async with jwks_server(document) as (url, fetches):
        config = _config(server.port or 0, {"jwks_url": url, "cache_size": 3})
        async with running_gateway(tmp_path, config) as gw:
            port = port_of(gw)
            for tok in (first, second, third, first, fourth):
                assert (await _get(port, tok)).status == 200
            # cached, least recently used first: third, first, fourth (second was dropped)
            before = len(fetches)
            document[0] = jwks(new)  # the old key is gone
            assert (await _get(port, token(new, claims()))).status == 200  # drops third
            assert len(fetches) == before + 1
            assert (await _get(port, first)).status == 200
            assert (await _get(port, fourth)).status == 200
            assert (await _get(port, second)).status == 401
            assert (await _get(port, third)).status == 401


async def test_a_request_waiting_for_a_jwks_fetch_survives_a_reload_that_replaces_the_stage(
    tmp_path: Path, upstream: tuple[TestServer, Seen]
) -> None:
    """The old stage is closed when the reload commits, but a request that began on the old
    snapshot is still waiting for the fetch it started: that fetch must end, not be cancelled."""
    server, _ = upstream
    old, new = RsaKey("2025"), RsaKey("2026")
    document = [jwks(old)]
    gate = asyncio.Event()
    gate.set()
    async with jwks_server(document, gate) as (url, fetches):
        config = _config(server.port or 0, {"jwks_url": url})
        async with running_gateway(tmp_path, config) as gw:
            port = port_of(gw)
            gate.clear()
            document[0] = jwks(old, new)
            before = len(fetches)
            waiting = asyncio.ensure_future(_get(port, token(new, claims())))
            await async_wait_until(lambda: len(fetches) > before, what="a fetch for the new kid")
            changed = {"jwks_url": url, "leeway": "45s"}
            write_config(tmp_path, _config(server.port or 0, changed))
            result = await gw.reload()
            assert result["ok"] is True, result
            gate.set()
            assert (await waiting).status == 200


async def test_a_jwks_url_without_keys_is_not_fetched_per_request(
    tmp_path: Path, upstream: tuple[TestServer, Seen]
) -> None:
    """While the JWKS endpoint serves no usable key, a flood of requests must not become a
    flood of fetches: a new one starts at most once a second."""
    server, _ = upstream
    key = RsaKey("k1")
    document = [b'{"keys": []}']
    async with jwks_server(document) as (url, fetches):
        config = _config(server.port or 0, {"jwks_url": url})
        async with running_gateway(tmp_path, config) as gw:
            port = port_of(gw)
            loop = asyncio.get_running_loop()
            started = loop.time()
            before = len(fetches)
            statuses = [(await _get(port, token(key, claims()))).status for _ in range(30)]
            elapsed = loop.time() - started
            assert statuses == [401] * 30
            assert len(fetches) - before <= 2 + int(elapsed)


async def test_rate_limit_keyed_by_a_claim(
    tmp_path: Path, upstream: tuple[TestServer, Seen]
) -> None:
    server, _ = upstream
    key = RsaKey("k1")
    (tmp_path / "jwks.json").write_bytes(jwks(key))
    limit = {"rate_limit": {"rate": 1, "per": "1m", "burst": 1, "key": "jwt:sub"}}
    async with running_gateway(tmp_path, _config(server.port or 0, JWKS_FILE, [limit])) as gw:
        port = port_of(gw)
        alice, bob = token(key, claims(sub="alice")), token(key, claims(sub="bob"))
        assert (await _get(port, alice)).status == 200
        assert (await _get(port, alice)).status == 429
        assert (await _get(port, bob)).status == 200


def _skipped(gw: Gateway) -> dict[str, float]:
    """gateway_jwt_keys_skipped_total by reason."""
    family = gw.metrics.jwt_keys_skipped_total
    return {labels[0]: child.value for labels, child in family.children.items()}


def _expected_skips() -> dict[str, float]:
    counts: dict[str, float] = {}
    for _, _, reason in UNUSABLE_KEYS:
        counts[reason] = counts.get(reason, 0) + 1
    return counts


async def test_jwks_file_with_unusable_keys_loads_and_counts_them(
    tmp_path: Path, upstream: tuple[TestServer, Seen]
) -> None:
    server, _ = upstream
    good = RsaKey("good")
    (tmp_path / "jwks.json").write_bytes(jwks(*JUNK, good))
    async with running_gateway(tmp_path, _config(server.port or 0, JWKS_FILE)) as gw:
        assert (await _get(port_of(gw), token(good, claims()))).status == 200
        assert _skipped(gw) == _expected_skips()
        assert 'gateway_jwt_keys_skipped_total{reason="weak"} 1' in gw.metrics_text()


async def test_jwks_url_with_unusable_keys_and_a_rotation(
    tmp_path: Path, upstream: tuple[TestServer, Seen]
) -> None:
    server, _ = upstream
    old, new = RsaKey("2025"), EcKey("2026")
    document = [jwks(JUNK[0], old, *JUNK[1:])]
    async with (
        jwks_server(document) as (url, fetches),
        running_gateway(tmp_path, _config(server.port or 0, {"jwks_url": url})) as gw,
    ):
        port = port_of(gw)
        assert (await _get(port, token(old, claims()))).status == 200
        assert _skipped(gw) == _expected_skips()
        before = len(fetches)
        document[0] = jwks(new, *JUNK)  # rotated: the old key gone, the junk still there
        assert (await _get(port, token(new, claims()))).status == 200
        assert len(fetches) == before + 1
        assert _skipped(gw) == {r: 2 * n for r, n in _expected_skips().items()}


async def test_jwks_url_with_no_usable_key_keeps_the_keys_it_had(
    tmp_path: Path, upstream: tuple[TestServer, Seen]
) -> None:
    server, _ = upstream
    key = RsaKey("k1")
    document = [jwks(key)]
    async with (
        jwks_server(document) as (url, fetches),
        running_gateway(tmp_path, _config(server.port or 0, {"jwks_url": url})) as gw,
    ):
        port = port_of(gw)
        assert (await _get(port, token(key, claims()))).status == 200
        before = len(fetches)
        document[0] = jwks(*JUNK)
        # an unknown kid makes the stage fetch again: the set it gets has nothing usable
        assert (await _get(port, token(key, claims(), kid="k2"))).status == 401
        assert len(fetches) == before + 1
        stage = next(s for _, s in gw.snapshot.stages.values() if isinstance(s, JwtStage))
        assert "no usable" in (stage.jwks_error or "")
        assert (await _get(port, token(key, claims(sub="bob")))).status == 200


#: a newline cannot be sent inside a header value: the request would not parse
SENDABLE = [m for m in MISSPELLINGS if m[0] != "newline-inside"]


@pytest.mark.parametrize("misspell", [m[1] for m in SENDABLE], ids=[m[0] for m in SENDABLE])
async def test_a_misspelled_token_is_malformed(
    tmp_path: Path, upstream: tuple[TestServer, Seen], misspell: Callable[[str], str]
) -> None:
    server, seen = upstream
    key = RsaKey("k1")
    (tmp_path / "jwks.json").write_bytes(jwks(key))
    async with running_gateway(tmp_path, _config(server.port or 0, JWKS_FILE)) as gw:
        port = port_of(gw)
        canonical = token(key, claims(note=URL_SAFE_FILLER))
        assert (await _get(port, canonical)).status == 200
        refused = await _get(port, misspell(canonical))
        assert refused.status == 401
        assert 'error_description="malformed token"' in (refused.header("www-authenticate") or "")
        assert len(seen.requests) == 1
