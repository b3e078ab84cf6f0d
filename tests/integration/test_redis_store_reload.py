"""A redis store across reloads: an unchanged store keeps its client (and connections) and the
stages using it stay; a changed one is a new client, the stages naming it are rebuilt to use it,
and the old client is closed only after the grace for requests that began before."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.runtime import shared as shared_module
from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.faulty import faulty_upstreams
from tests.support.gateway import port_of, running_gateway, write_config
from tests.support.idempotency import post
from tests.support.redis_server import RedisServer


def _config(redis_url: str, upstream_url: str, *, prefix: str, timeout: str = "5s") -> str:
    return gateway_yaml(
        upstreams={"app": upstream_to(upstream_url, timeouts={"response_header": timeout})},
        routes=[route("pay", "app", pipeline=[{"idempotency": {"store": "shared"}}])],
        stores={"shared": {"url": redis_url, "prefix": prefix, "timeout": "1s"}},
    )


def _idempotency_stage(gw: Gateway) -> object:
    [stage] = [stage for spec, stage in gw.snapshot.stages.values() if spec.kind == "idempotency"]
    return stage


def _keys(redis: RedisServer, pattern: str) -> list[str]:
    return redis.command("--scan", "--pattern", pattern).split()


async def test_an_unchanged_store_is_kept_and_a_changed_one_replaced(
    tmp_path: Path, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[object] = []
    # the old client is closed after the grace: record when that is asked for instead of waiting
    monkeypatch.setattr(shared_module, "STORE_GRACE", 0.0)
    async with (
        faulty_upstreams("pay") as [up],
        running_gateway(tmp_path, _config(redis.url, up.url, prefix="one:")) as gw,
    ):
        assert gw._shared is not None
        store = gw._shared.live_stores["shared"]
        stage = _idempotency_stage(gw)
        assert (await post(port_of(gw), "k1")).status == 200
        assert _keys(redis, "one:idem:*")

        # a change elsewhere: the same store (its connections) and the same stage
        write_config(tmp_path, _config(redis.url, up.url, prefix="one:", timeout="6s"))
        assert (await gw.reload())["changed"]
        assert gw._shared.live_stores["shared"] is store
        assert _idempotency_stage(gw) is stage
        replay = await post(port_of(gw), "k1")
        assert replay.header("Idempotent-Replayed") == "true"

        # the store's settings change: a new client, and the stage is rebuilt to use it
        original_close = store.aclose
        done = asyncio.Event()
        traffic_over = asyncio.Event()
        close_asked = asyncio.Event()

        async def recorded_close() -> None:
            closed.append(store)
            close_asked.set()
            # the grace (0 here) stands for "once the requests that began on the old snapshot
            # are done": the traffic below ends first, whatever the machine's timing
            await traffic_over.wait()
            await original_close()

        monkeypatch.setattr(store, "aclose", recorded_close)
        write_config(tmp_path, _config(redis.url, up.url, prefix="two:"))
        # requests keep coming while the store is swapped: none is dropped or refused

        async def traffic() -> list[int]:
            statuses = []
            index = 0
            while not done.is_set():
                index += 1
                statuses.append((await post(port_of(gw), f"during-{index}")).status)
            return statuses

        load = asyncio.ensure_future(traffic())
        await asyncio.sleep(0)  # the first request is under way
        assert (await gw.reload())["ok"]
        # the commit asks for the close at once (grace 0) ...
        await asyncio.wait_for(close_asked.wait(), 5)
        done.set()
        during = await load
        traffic_over.set()  # ... which goes on once the traffic has stopped
        assert during
        assert set(during) == {200}
        assert gw._shared.live_stores["shared"] is not store
        assert _idempotency_stage(gw) is not stage
        assert (await post(port_of(gw), "k2")).status == 200
        assert _keys(redis, "two:idem:*")
        assert not _keys(redis, "one:idem:*k2*")
        # the old records stay where they were: "k1" is new under the new prefix
        fresh = await post(port_of(gw), "k1")
        assert (fresh.status, fresh.header("Idempotent-Replayed")) == (200, None)
        assert up.requests["POST"] == 3 + len(during)
    assert closed == [store]
