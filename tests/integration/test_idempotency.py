"""Idempotency over real sockets: one execution per key, replays byte for byte, conflicts,
releases, unknown outcomes, signed tokens, and retries of a keyed POST."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.core.idempotency_tokens import mint_token
from gateway.stores.memory import MemoryStore
from tests.support.faulty import FaultyUpstream, closed_port, faulty_upstreams
from tests.support.gateway import port_of, running_gateway, write_config
from tests.support.idempotency import code, idempotency_config, post
from tests.support.raw import close_writer, exchange, open_raw

SECRET = "idempotency-secret-for-tests-0123456789"


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[tuple[FaultyUpstream, Gateway]]:
    """Upstream `up` behind route `pay`, whose idempotency stage has its defaults."""
    async with (
        faulty_upstreams("up") as [up],
        running_gateway(tmp_path, idempotency_config([up.url])) as gw,
    ):
        yield up, gw


async def test_replay_byte_for_byte_and_one_execution(
    keyed: tuple[FaultyUpstream, Gateway],
) -> None:
    up, gw = keyed
    port = port_of(gw)
    first = await post(port, "order-1")
    assert first.status == 200
    assert first.header("idempotent-replayed") is None
    second = await post(port, "order-1")
    assert second.status == 200
    assert second.body == first.body
    assert second.header("x-endpoint") == "up"
    assert second.header("idempotent-replayed") == "true"
    assert up.requests["POST"] == 1
    reused = await post(port, "order-1", body=b"amount=99")
    assert (reused.status, code(reused)) == (422, "idempotency_key_reused")
    other_path = await post(port, "order-1", path="/refund")
    assert other_path.status == 422
    assert (await exchange(port, b"GET /pay HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200
    assert up.requests["POST"] == 1
    text = gw.metrics_text()
    assert 'gateway_idempotency_total{route="pay",outcome="new"} 1' in text
    assert 'gateway_idempotency_total{route="pay",outcome="replayed"} 1' in text
    assert 'gateway_idempotency_total{route="pay",outcome="reused"} 2' in text


async def test_missing_and_invalid_keys(keyed: tuple[FaultyUpstream, Gateway]) -> None:
    up, gw = keyed
    port = port_of(gw)
    missing = await post(port, None)
    assert (missing.status, code(missing)) == (400, "idempotency_key_missing")
    for bad in ("x" * 256, "has space", "ünïcode"):
        response = await post(port, bad)
        assert (response.status, code(response)) == (400, "idempotency_key_invalid")
    assert up.total == 0


async def test_fifty_concurrent_duplicates_execute_once(
    keyed: tuple[FaultyUpstream, Gateway],
) -> None:
    up, gw = keyed
    port = port_of(gw)
    up.mode = "slow:0.3"
    results = await asyncio.gather(*(post(port, "same") for _ in range(50)))
    statuses = [r.status for r in results]
    assert up.requests["POST"] == 1
    assert statuses.count(200) >= 1
    assert set(statuses) <= {200, 409}
    for r in results:
        if r.status == 409:
            assert code(r) == "idempotency_key_in_use"
            assert int(r.header("retry-after") or 0) >= 1
    # after completion every duplicate is a replay
    again = await post(port, "same")
    assert again.header("idempotent-replayed") == "true"
    assert up.requests["POST"] == 1


async def test_upstream_answers_are_stored_an_unanswered_write_is_unknown(
    keyed: tuple[FaultyUpstream, Gateway],
) -> None:
    up, gw = keyed
    port = port_of(gw)
    up.mode = "status:503"  # the upstream's own answer: stored, whatever its status
    assert (await post(port, "a")).status == 503
    up.mode = "ok"
    replay = await post(port, "a")
    assert (replay.status, replay.header("idempotent-replayed")) == (503, "true")
    # the request was written and no answer came: it may have run, so it never runs again
    up.mode = "reset"
    assert (await post(port, "b")).status == 502
    up.mode = "ok"
    repeat = await post(port, "b")
    assert (repeat.status, code(repeat)) == (409, "idempotency_outcome_unknown")
    assert up.requests["POST"] == 2  # "a" once, "b" once


async def test_a_request_never_sent_releases_its_key(tmp_path: Path) -> None:
    """Refused by the upstream's port: nothing was written, so the client may simply retry."""
    async with faulty_upstreams("up") as [up]:
        config = idempotency_config([f"http://127.0.0.1:{closed_port()}"])
        async with running_gateway(tmp_path, config) as gw:
            port = port_of(gw)
            assert (await post(port, "c")).status == 502
            again = await post(port, "c")
            assert again.status == 502  # went to the (still refusing) upstream again, not 409
            assert code(again) == "upstream_unavailable"
        assert up.total == 0


async def test_a_timeout_leaves_the_outcome_unknown(keyed: tuple[FaultyUpstream, Gateway]) -> None:
    up, gw = keyed
    port = port_of(gw)
    up.mode = "hang"
    assert (await post(port, "t")).status == 504
    up.mode = "ok"
    duplicate = await post(port, "t")
    assert (duplicate.status, code(duplicate)) == (409, "idempotency_outcome_unknown")
    assert up.requests["POST"] == 1


async def test_an_unknown_outcome_outlives_the_lock_time(
    tmp_path: Path, keyed: tuple[FaultyUpstream, Gateway]
) -> None:
    """Issue 12, defect 2: after a 504 the key's lock expired at the route's timeout + 30 s and
    a repeat ran the request again.  The store's clock is moved on instead of waiting: the
    stage is rebuilt (by a reload changing its ttl) on a memory store whose clock the test
    sets."""
    loop = asyncio.get_running_loop()
    skipped = 0.0
    up, gw = keyed
    gw.shared.memory = MemoryStore(clock=lambda: loop.time() + skipped)
    write_config(tmp_path, idempotency_config([up.url], {"ttl": "1h"}))
    assert (await gw.reload())["ok"]
    port = port_of(gw)
    up.mode = "hang"
    assert (await post(port, "late")).status == 504
    up.mode = "ok"
    skipped = 600.0  # far past the lock: the route's timeout (30 s) + 30 s
    repeat = await post(port, "late")
    assert (repeat.status, code(repeat)) == (409, "idempotency_outcome_unknown")
    assert up.requests["POST"] == 1
    skipped = 3601.0  # the record's ttl is over: the key is a new one
    assert (await post(port, "late")).status == 200
    assert up.requests["POST"] == 2


async def test_large_responses_are_not_stored_but_never_run_twice(tmp_path: Path) -> None:
    async with faulty_upstreams("up") as [up]:
        stage = {"max_response_bytes": "1KiB"}
        async with running_gateway(tmp_path, idempotency_config([up.url], stage)) as gw:
            port = port_of(gw)
            big = b"x" * 4096  # the upstream echoes the body back: over the limit
            first = await post(port, "big", body=big)
            assert (first.status, first.body) == (200, big)
            duplicate = await post(port, "big", body=big)
            assert (duplicate.status, code(duplicate)) == (409, "idempotency_key_in_use")
            assert "too large" in json.loads(duplicate.body)["detail"]
            assert up.requests["POST"] == 1


async def test_signed_tokens_bound_to_the_client(tmp_path: Path) -> None:
    stage = {"token": {"secret": SECRET, "window": "5m", "client_id": "header:X-Client"}}
    async with (
        faulty_upstreams("up") as [up],
        running_gateway(tmp_path, idempotency_config([up.url], stage)) as gw,
    ):
        port = port_of(gw)
        token = mint_token(SECRET, "client-a")
        ok = await post(port, token, headers="X-Client: client-a\r\n")
        assert ok.status == 200
        stolen = await post(port, token, headers="X-Client: client-b\r\n")
        assert (stolen.status, code(stolen)) == (400, "idempotency_key_invalid")
        old = mint_token(SECRET, "client-a", unix_ms=1_000_000)
        expired = await post(port, old, headers="X-Client: client-a\r\n")
        assert expired.status == 400
        assert "expired" in json.loads(expired.body)["detail"]
        opaque = await post(port, "plain-key", headers="X-Client: client-a\r\n")
        assert opaque.status == 400
        replay = await post(port, token, headers="X-Client: client-a\r\n")
        assert replay.header("idempotent-replayed") == "true"
        # a token minted for the empty client id never passes for clients that lack one
        anonymous = mint_token(SECRET, "")
        missing = await post(port, anonymous)
        assert (missing.status, code(missing)) == (400, "idempotency_key_invalid")
        assert "x-client header" in json.loads(missing.body)["detail"]
        assert up.requests["POST"] == 1


@pytest.mark.parametrize(
    ("stage", "resent"),
    [({}, False), ({"upstream_deduplicates": True}, True)],
    ids=["plain", "upstream-deduplicates"],
)
async def test_a_written_keyed_post_is_resent_only_to_an_upstream_that_deduplicates(
    tmp_path: Path, stage: dict[str, Any], resent: bool
) -> None:
    retry = {"retry": {"attempts": 2, "backoff": {"base": "1ms", "max": "2ms"}}}
    async with faulty_upstreams("bad", "good") as [bad, good]:
        config = idempotency_config([bad.url, good.url], stage, after=[retry])
        async with running_gateway(tmp_path, config) as gw:
            port = port_of(gw)
            bad.mode = "reset"  # reads the request, then resets: it may have run
            statuses = [(await post(port, f"k{i}")).status for i in range(4)]
            assert bad.requests["POST"] >= 1  # round robin: some went to "bad" first
            if resent:
                assert statuses == [200] * 4  # re-sent to "good", which runs each once
                assert good.requests["POST"] == 4
            else:
                # never re-sent: each request ran on one upstream only
                assert statuses.count(502) == bad.requests["POST"]
                assert statuses.count(200) == good.requests["POST"]
                assert bad.requests["POST"] + good.requests["POST"] == 4


async def test_records_do_not_survive_a_restart_with_the_memory_store(tmp_path: Path) -> None:
    async with faulty_upstreams("up") as [up]:
        for _ in range(2):
            async with running_gateway(tmp_path, idempotency_config([up.url])) as gw:
                assert (await post(port_of(gw), "k")).status == 200
        # documented: the memory store is per process; a restarted gateway runs it again
        assert up.requests["POST"] == 2


async def test_a_repeat_while_the_first_body_streams_waits(
    keyed: tuple[FaultyUpstream, Gateway],
) -> None:
    up, gw = keyed
    port = port_of(gw)
    up.mode = "drip:0.5"
    reader, writer = await open_raw(port)
    writer.write(
        b"POST /pay HTTP/1.1\r\nHost: a\r\nIdempotency-Key: d\r\nContent-Length: 1\r\n\r\nx"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    during = await post(port, "d", body=b"x")
    assert (during.status, code(during)) == (409, "idempotency_key_in_use")
    assert "still being sent" in json.loads(during.body)["detail"]
    rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
    assert b"second half" in rest
    await close_writer(writer)
    # the record is completed just after the body's end reaches the client
    for _ in range(100):
        after = await post(port, "d", body=b"x")
        if after.status != 409:
            break
        await asyncio.sleep(0.02)
    assert after.header("idempotent-replayed") == "true"
    assert after.body == b"first half;second half"
    assert up.requests["POST"] == 1
