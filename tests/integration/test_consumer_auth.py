"""api_key and basic_auth over real sockets: 401s with their challenges, the consumer forwarded
as X-Consumer and a client's copy dropped on every route, the credential never forwarded (a key
in the query cut from the upstream's request line), limits and idempotency records per
consumer, watched credential files applied live and an invalid one refused, and no key,
digest, password or hash in /admin, the access log or the logs."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
from pathlib import Path

import aiohttp
import argon2
import bcrypt
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from gateway.observability import access_log
from tests.integration.conftest import Seen
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.gateway import port_of, running_gateway
from tests.support.process import async_wait_until
from tests.support.raw import RawResponse, exchange

BILLING_KEY = "bk-6f1c0e9a4b7d2e8f5a3c1b9d7e6f4a2c"
REPORTING_KEY = "rk-0d9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a"
ROTATED_KEY = "nk-1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d"
ALICE_PASSWORD = "correct horse battery staple"
BOB_PASSWORD = "tr0ub4dor&3"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def keys_file(**consumers: str) -> str:
    return "".join(f"{consumer}: {sha256(key)}\n" for consumer, key in consumers.items())


def bcrypt_line(user: str, password: str) -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    return f"{user}:{hashed.replace('$2b$', '$2y$')}\n"


def argon2_line(user: str, password: str) -> str:
    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    return f"{user}:{hasher.hash(password)}\n"


def _config(upstream_port: int, **routes_options: object) -> str:
    app = upstream_to(f"http://127.0.0.1:{upstream_port}")
    return gateway_yaml(
        upstreams={"app": app},
        access_log={"enabled": True},
        middlewares={
            "partners": {"api_key": {"keys_file": "keys.yaml"}},
        },
        routes=[
            route(
                "keyed",
                "app",
                "/k/",
                pipeline=[
                    "partners",
                    {"rate_limit": {"rate": 2, "per": "1m", "key": "consumer"}},
                ],
            ),
            route(
                "query",
                "app",
                "/q/",
                pipeline=[{"api_key": {"keys_file": "keys.yaml", "query": "api_key"}}],
            ),
            route(
                "ops",
                "app",
                "/ops/",
                methods=["GET", "POST"],
                pipeline=[
                    {"basic_auth": {"users_file": "users.htpasswd", "realm": "ops team"}},
                    {"idempotency": {"methods": ["POST"]}},
                ],
            ),
            route("open", "app", "/"),
        ],
    )


def _write_credentials(directory: Path) -> None:
    (directory / "keys.yaml").write_text(keys_file(billing=BILLING_KEY, reporting=REPORTING_KEY))
    (directory / "users.htpasswd").write_text(
        bcrypt_line("alice", ALICE_PASSWORD) + argon2_line("bob", BOB_PASSWORD)
    )


async def _get(port: int, target: str, *headers: str, method: str = "GET") -> RawResponse:
    lines = "".join(f"{h}\r\n" for h in headers)
    length = "Content-Length: 2\r\n" if method == "POST" else ""
    body = "{}" if method == "POST" else ""
    request = f"{method} {target} HTTP/1.1\r\nHost: a\r\n{lines}{length}\r\n{body}"
    return await exchange(port, request.encode())


def _basic(user: str, password: str) -> str:
    return "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _last(seen: Seen) -> tuple[str, list[tuple[str, str]]]:
    request = seen.requests[-1]
    headers = [(n.decode().lower(), v.decode()) for n, v in request["headers"]]
    return request["path"], headers


def _problem(response: RawResponse) -> dict[str, object]:
    assert response.header("content-type") == "application/problem+json"
    problem: dict[str, object] = json.loads(response.body)
    return problem


async def _admin(gw: Gateway, path: str) -> str:
    assert gw.admin is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{gw.admin.port}{path}") as response,
    ):
        assert response.status == 200
        return await response.text()


SECRETS = (
    BILLING_KEY,
    REPORTING_KEY,
    sha256(BILLING_KEY),
    sha256(REPORTING_KEY),
    ALICE_PASSWORD,
    BOB_PASSWORD,
    base64.b64encode(f"alice:{ALICE_PASSWORD}".encode()).decode(),
    "$2y$04$",
    "$argon2id$",
)


async def test_api_keys_consumers_and_spoofed_x_consumer(
    tmp_path: Path,
    upstream: tuple[TestServer, Seen],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, seen = upstream
    _write_credentials(tmp_path)
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    caplog.set_level(logging.DEBUG)
    async with running_gateway(tmp_path, _config(server.port or 0)) as gw:
        port = port_of(gw)
        missing = await _get(port, "/k/orders")
        assert missing.status == 401
        assert _problem(missing)["code"] == "unauthenticated"
        assert missing.header("www-authenticate") == (
            'ApiKey realm="gateway", in="header", name="X-API-Key"'
        )
        wrong = await _get(port, "/k/orders", f"X-API-Key: {ROTATED_KEY}")
        assert wrong.status == 401
        assert "not valid" in str(_problem(wrong)["detail"])
        assert seen.requests == []

        spoofs = ("X-Consumer: admin", "X_Consumer: admin", "x-consumer: root")
        ok = await _get(port, "/k/orders", f"X-API-Key: {BILLING_KEY}", *spoofs)
        assert ok.status == 200
        path, headers = _last(seen)
        assert path == "/k/orders"
        # the consumer the key names, once; never the client's copies, never the key
        assert [v for n, v in headers if n.replace("_", "-") == "x-consumer"] == ["billing"]
        assert not [n for n, _ in headers if n == "x-api-key"]

        # on a route without any auth stage the client's X-Consumer is dropped all the same
        assert (await _get(port, "/open", *spoofs)).status == 200
        _, headers = _last(seen)
        assert not [n for n, _ in headers if n.replace("_", "-") == "x-consumer"]

        # a limit per consumer: billing has 2 a minute, reporting its own 2
        assert (await _get(port, "/k/orders", f"X-API-Key: {BILLING_KEY}")).status == 200
        assert (await _get(port, "/k/orders", f"X-API-Key: {BILLING_KEY}")).status == 429
        assert (await _get(port, "/k/orders", f"X-API-Key: {REPORTING_KEY}")).status == 200
        assert _last(seen)[1].count(("x-consumer", "reporting")) == 1

        metrics = gw.metrics_text()
        for outcome, count in (("allowed", 4), ("missing", 1), ("invalid", 1)):
            sample = f'gateway_stage_total{{route="keyed",stage="api_key",outcome="{outcome}"}}'
            assert f"{sample} {count}" in metrics

        config_info = await _admin(gw, "/admin/config")
        routes_info = json.loads(await _admin(gw, "/admin/routes"))
        keyed = next(r for r in routes_info if r["name"] == "keyed")
        assert keyed["stages"][0] == {
            "name": "partners",
            "kind": "api_key",
            "key": {"in": "header", "name": "X-API-Key"},
            "consumers": 2,
            "hide_credentials": True,
        }
        ops = next(r for r in routes_info if r["name"] == "ops")
        assert ops["stages"][0] == {
            "name": "basic_auth",
            "kind": "basic_auth",
            "realm": "ops team",
            "users": 2,
            "hide_credentials": True,
            "cache_ttl_seconds": 300.0,
        }
        gw.snapshot.access_log.flush()
        access_log.STDOUT.flush()
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    outcomes = [line["stages"].get("api_key") for line in lines if line.get("route") == "keyed"]
    assert outcomes.count("allowed") == 4
    assert "missing" in outcomes
    assert "invalid" in outcomes
    for text in (out.getvalue(), caplog.text, config_info, json.dumps(routes_info), metrics):
        for secret in SECRETS:
            assert secret not in text


async def test_a_key_in_the_query_never_reaches_the_upstream(
    tmp_path: Path, upstream: tuple[TestServer, Seen]
) -> None:
    server, seen = upstream
    _write_credentials(tmp_path)
    async with running_gateway(tmp_path, _config(server.port or 0)) as gw:
        port = port_of(gw)
        ok = await _get(port, f"/q/search?term=a+b&api_key={BILLING_KEY}&page=2")
        assert ok.status == 200
        path, headers = _last(seen)
        assert path == "/q/search?term=a+b&page=2"
        assert ("x-consumer", "billing") in headers
        assert (await _get(port, f"/q/x?api_key={REPORTING_KEY}")).status == 200
        assert _last(seen)[0] == "/q/x"
        refused = await _get(port, "/q/x", f"X-API-Key: {BILLING_KEY}")
        assert refused.status == 401
        assert refused.header("www-authenticate") == (
            'ApiKey realm="gateway", in="query", name="api_key"'
        )
        twice = await _get(port, f"/q/x?api_key={BILLING_KEY}&api_key={BILLING_KEY}")
        assert twice.status == 401
        assert all(BILLING_KEY not in r["path"] for r in seen.requests)


async def test_basic_auth_consumers_and_idempotency_per_consumer(
    tmp_path: Path, upstream: tuple[TestServer, Seen]
) -> None:
    server, seen = upstream
    _write_credentials(tmp_path)
    async with running_gateway(tmp_path, _config(server.port or 0)) as gw:
        port = port_of(gw)
        missing = await _get(port, "/ops/deploy")
        assert missing.status == 401
        assert missing.header("www-authenticate") == 'Basic realm="ops team", charset="UTF-8"'
        assert _problem(missing)["code"] == "unauthenticated"

        for user, password in (("alice", ALICE_PASSWORD), ("bob", BOB_PASSWORD)):
            ok = await _get(port, "/ops/deploy", _basic(user, password), "X-Consumer: root")
            assert ok.status == 200
            _, headers = _last(seen)
            assert [v for n, v in headers if n == "x-consumer"] == [user]
            assert not [n for n, _ in headers if n == "authorization"]

        # a wrong password and an unknown user get the same answer
        answers = []
        for user, password in (("alice", BOB_PASSWORD), ("mallory", ALICE_PASSWORD)):
            refused = await _get(port, "/ops/deploy", _basic(user, password))
            problem = _problem(refused)
            problem.pop("request_id")
            answers.append((refused.status, refused.header("www-authenticate"), problem))
        assert answers[0] == answers[1]
        assert answers[0][0] == 401

        # idempotency records per consumer (scope: auto): bob's use of alice's key is his own
        before = len(seen.requests)
        key = "Idempotency-Key: order-7"
        first = await _get(port, "/ops/orders", _basic("alice", ALICE_PASSWORD), key, method="POST")
        again = await _get(port, "/ops/orders", _basic("alice", ALICE_PASSWORD), key, method="POST")
        other = await _get(port, "/ops/orders", _basic("bob", BOB_PASSWORD), key, method="POST")
        assert (first.status, again.status, other.status) == (200, 200, 200)
        assert again.header("idempotent-replayed") == "true"
        assert other.header("idempotent-replayed") is None
        assert len(seen.requests) == before + 2  # alice's first and bob's

        metrics = gw.metrics_text()
        allowed = 'gateway_stage_total{route="ops",stage="basic_auth",outcome="allowed"} 5'
        assert allowed in metrics
        assert 'gateway_stage_total{route="ops",stage="basic_auth",outcome="invalid"} 2' in metrics


def _save(path: Path, text: str) -> None:
    """Save the way editors do: a temporary file renamed over the original."""
    temporary = path.with_name(f".{path.name}.swp")
    temporary.write_text(text)
    os.replace(temporary, path)


async def _status(port: int, target: str, *headers: str) -> int:
    return (await _get(port, target, *headers)).status


async def test_credential_files_apply_live_and_an_invalid_one_is_refused(
    tmp_path: Path, upstream: tuple[TestServer, Seen], caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = upstream
    _write_credentials(tmp_path)
    caplog.set_level(logging.DEBUG)
    async with running_gateway(tmp_path, _config(server.port or 0), watch=True) as gw:
        port = port_of(gw)
        # the route without a rate limit, reading the same file
        billing = f"/q/a?api_key={BILLING_KEY}"
        rotated = f"/q/a?api_key={ROTATED_KEY}"
        assert await _status(port, billing) == 200
        assert await _status(port, rotated) == 401
        # billing's key is rotated: the new one in, the old one out
        _save(tmp_path / "keys.yaml", keys_file(billing=ROTATED_KEY, reporting=REPORTING_KEY))
        applied = gw.metrics.config_reloads_total.labels("success")
        before = applied.value
        await async_wait_until(lambda: applied.value > before, within=10, what="reload")
        assert await _status(port, rotated) == 200
        assert await _status(port, billing) == 401

        # alice's password is verified (and remembered), then changed in the file
        alice = _basic("alice", ALICE_PASSWORD)
        assert await _status(port, "/ops/x", alice) == 200
        _save(
            tmp_path / "users.htpasswd",
            bcrypt_line("alice", BOB_PASSWORD) + argon2_line("bob", BOB_PASSWORD),
        )
        before = applied.value
        await async_wait_until(lambda: applied.value > before, within=10, what="reload")
        # a new stage, a new cache: the old password is checked against the new hash
        assert await _status(port, "/ops/x", alice) == 401
        assert await _status(port, "/ops/x", _basic("alice", BOB_PASSWORD)) == 200

        # an invalid file: a plain key where a digest belongs. Refused whole: the keys in force
        # stay in force, the error names the path, never the value
        failures = gw.metrics.config_reloads_total.labels("failure")
        before = failures.value
        _save(tmp_path / "keys.yaml", f"billing: {BILLING_KEY}\n")
        await async_wait_until(lambda: failures.value > before, within=10, what="rejection")
        assert gw.last_reload["ok"] is False
        error = str(gw.last_reload["error"])
        assert "middlewares.partners.api_key.keys_file: billing: must be the key's sha256" in error
        assert gw.metrics.config_last_reload_success.labels().value == 0
        assert await _status(port, rotated) == 200
        config_info = await _admin(gw, "/admin/config")
        assert "keys_file" in config_info
        # an MD5 hash in the users file: refused too, naming the line and the user
        before = failures.value
        _save(tmp_path / "users.htpasswd", "alice:$apr1$abcdefgh$0123456789abcdefghijkl\n")
        await async_wait_until(lambda: failures.value > before, within=10, what="rejection")
        assert "line 1: user 'alice': an MD5 (apr1) hash is refused" in str(gw.last_reload["error"])
        assert await _status(port, "/ops/x", _basic("alice", BOB_PASSWORD)) == 200
    # the rejections were logged, with their paths, and nothing secret
    assert "keys_file: billing: must be the key's sha256" in caplog.text
    for text in (caplog.text, config_info):
        for secret in (BILLING_KEY, ROTATED_KEY, sha256(ROTATED_KEY), ALICE_PASSWORD):
            assert secret not in text
