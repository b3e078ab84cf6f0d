"""Idempotency records are bounded in memory (issue 11, defect 4), over real sockets.

The upstream counts executions by key (X-Test-Id): completed records beyond `max_keys` are
evicted oldest first and counted, the newest still replay without running again, a request in
flight keeps its lock however many keys pass, and when only locks remain a new key is refused
with 503 `store_unavailable` instead of being run without protection.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from tests.support.faulty import FaultyUpstream, faulty_upstreams
from tests.support.gateway import port_of, running_gateway
from tests.support.idempotency import code, idempotency_config, post, post_each
from tests.support.raw import RawResponse


def _metric(text: str, name: str) -> float:
    prefix = f'{name}{{route="pay"}} '
    [line] = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(line.removeprefix(prefix))


async def test_max_keys_evicts_the_oldest_completed_records(tmp_path: Path) -> None:
    async with (
        faulty_upstreams("up") as [up],
        running_gateway(tmp_path, idempotency_config([up.url], {"max_keys": 50})) as gw,
    ):
        port = port_of(gw)
        keys = [f"order-{i}" for i in range(500)]
        assert {r.status for r in await post_each(port, keys)} == {200}
        text = gw.metrics_text()
        assert _metric(text, "gateway_idempotency_records") == 50
        assert _metric(text, "gateway_idempotency_evictions_total") == 450
        assert _metric(text, "gateway_idempotency_records_bytes") > 0

        repeats = await post_each(port, keys[-50:])
        assert {r.header("idempotent-replayed") for r in repeats} == {"true"}
        assert up.executions == Counter(keys)  # every key ran once, the repeats not again
        # documented trade-off: a key evicted before its ttl runs again when repeated
        await post_each(port, keys[:1])
        assert up.executions["order-0"] == 2


async def _held(port: int, up: FaultyUpstream, key: str) -> asyncio.Task[RawResponse]:
    """A keyed POST the upstream holds once it arrived (the test sets `up.held[key]`)."""
    up.held[key] = asyncio.Event()
    up.arrived.clear()
    task = asyncio.create_task(post(port, key, headers=f"X-Test-Id: {key}\r\n"))
    await up.arrived.wait()
    return task


async def test_a_request_in_flight_is_never_evicted(tmp_path: Path) -> None:
    config = {"max_keys": 50}
    async with (
        faulty_upstreams("up") as [up],
        running_gateway(tmp_path, idempotency_config([up.url], config, timeout="10s")) as gw,
    ):
        port = port_of(gw)
        first = await _held(port, up, "slow")
        assert {r.status for r in await post_each(port, [f"k{i}" for i in range(100)])} == {200}
        duplicate = await post(port, "slow", headers="X-Test-Id: slow\r\n")
        assert (duplicate.status, code(duplicate)) == (409, "idempotency_key_in_use")
        text = gw.metrics_text()
        assert _metric(text, "gateway_idempotency_records") == 50  # 49 completed + the lock
        assert _metric(text, "gateway_idempotency_evictions_total") == 51

        up.held["slow"].set()
        assert (await first).status == 200
        replay = await post(port, "slow", headers="X-Test-Id: slow\r\n")
        assert replay.header("idempotent-replayed") == "true"
        assert up.executions["slow"] == 1


async def test_only_locks_left_refuses_a_new_key(tmp_path: Path) -> None:
    async with (
        faulty_upstreams("up") as [up],
        running_gateway(
            tmp_path, idempotency_config([up.url], {"max_keys": 2}, timeout="10s")
        ) as gw,
    ):
        port = port_of(gw)
        held = [await _held(port, up, key) for key in ("a", "b")]
        refused = await post(port, "c", headers="X-Test-Id: c\r\n")
        assert (refused.status, code(refused)) == (503, "store_unavailable")
        assert "c" not in up.executions
        for key in ("a", "b"):
            up.held[key].set()
        assert [(await task).status for task in held] == [200, 200]
        # completed records make room again: the older of "a" and "b" is evicted for "c"
        assert (await post(port, "c", headers="X-Test-Id: c\r\n")).status == 200
        assert up.executions == {"a": 1, "b": 1, "c": 1}
        text = gw.metrics_text()
        assert 'gateway_idempotency_total{route="pay",outcome="store_error"} 1' in text
        assert _metric(text, "gateway_idempotency_evictions_total") == 1
