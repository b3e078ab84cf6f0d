"""Limits and idempotency records shared through a real three-master Redis Cluster by real
`gateway run` processes with two workers each: many keys spread over every master, each key's
limit shared by both gateways' four workers; duplicates of one POST over both gateways run
once and are replayed by either; and a master stopped under load fails only the keys it
serves, per `on_store_error`, while the others' records keep being replayed.  Executions are
counted by the upstream, round trips by each master's own `INFO commandstats`."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.faulty import FaultyUpstream, faulty_upstreams
from tests.support.gateway_processes import Gateways
from tests.support.idempotency import code, post
from tests.support.raw import RawResponse, exchange
from tests.support.redis_cluster import RedisClusterServers

#: tenants, each with its own bucket: 24 keys land on every master of three
TENANTS = [f"t{n}" for n in range(24)]
LIMIT = 20


@pytest.fixture
async def upstream() -> AsyncIterator[FaultyUpstream]:
    async with faulty_upstreams("app") as [up]:
        yield up


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(tmp_path / "redis-cluster").start()
    try:
        # the masters left keep serving their slots while one is down (see the README)
        for node in servers.nodes:
            node.command("CONFIG", "SET", "cluster-require-full-coverage", "no")
        yield servers
    finally:
        servers.stop()


def _stores(cluster: RedisClusterServers) -> dict[str, object]:
    return {"shared": {"cluster": True, "nodes": cluster.urls[:2], "timeout": "300ms"}}


def _keys_per_master(cluster: RedisClusterServers, pattern: str) -> list[int]:
    return [len(node.command("KEYS", pattern).split()) for node in cluster.nodes]


def _round_trips(cluster: RedisClusterServers) -> int:
    """Scripts run, over every master (the first run of a script on a master is an EVAL)."""
    trips = 0
    for node in cluster.nodes:
        stats = node.command("INFO", "commandstats")
        for command in ("evalsha", "eval"):
            line = re.search(rf"cmdstat_{command}:(\S+)", stats)
            if line is not None:
                fields = dict(item.split("=") for item in line.group(1).split(","))
                trips += int(fields["calls"]) - int(fields.get("failed_calls", 0))
    return trips


async def _get(port: int, tenant: str) -> RawResponse:
    request = (
        f"GET /item HTTP/1.1\r\nHost: a\r\nX-Tenant: {tenant}\r\nX-Test-Id: {tenant}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return await exchange(port, request, within=10)


@pytest.mark.timeout(180)
async def test_many_keys_over_every_master_each_limit_shared_by_two_gateways(
    cluster: RedisClusterServers, upstream: FaultyUpstream, gateways: Gateways
) -> None:
    """LIMIT an hour per tenant (no refill during the test), 2 x LIMIT requests per tenant spread
    over both gateways: each tenant is admitted at most LIMIT times (what is leased and not
    spent is never admitted), all tenants together at least 95 % of their limits."""
    stage = {
        "rate_limit": {"rate": LIMIT, "per": "1h", "key": "header:X-Tenant", "store": "shared"}
    }
    ports = [
        await gateways.start(gateways.config(name, upstream.url, [stage], _stores(cluster)))
        for name in ("a", "b")
    ]
    answers: list[tuple[str, RawResponse]] = []
    for wave in range(2 * LIMIT // 10):
        tenants = [tenant for tenant in TENANTS for _ in range(10)]
        replies = await asyncio.gather(
            *(_get(ports[(i + wave) % 2], tenant) for i, tenant in enumerate(tenants))
        )
        answers += zip(tenants, replies, strict=True)
    assert {reply.status for _, reply in answers} <= {200, 429}
    admitted = Counter(tenant for tenant, reply in answers if reply.status == 200)
    for tenant in TENANTS:
        assert admitted[tenant] <= LIMIT, (tenant, admitted[tenant])
        assert upstream.executions[tenant] == admitted[tenant]
    total = sum(admitted.values())
    assert total >= 0.95 * LIMIT * len(TENANTS), admitted
    held = _keys_per_master(cluster, "*rl:*")
    assert sum(held) == len(TENANTS)
    assert all(held), held  # the buckets are spread over all three masters
    trips = _round_trips(cluster)
    print(f"cluster round trips: {trips} for {total} admitted of {len(answers)}")
    assert trips < len(answers)


@pytest.mark.timeout(180)
async def test_duplicates_run_once_and_a_master_down_fails_only_its_keys(
    cluster: RedisClusterServers, upstream: FaultyUpstream, gateways: Gateways
) -> None:
    """50 concurrent duplicates of one POST over both gateways run once.  Then 24 records are
    written, one master is stopped, and repeating every key on both gateways: the keys of the
    masters left are replayed, those of the stopped one get 503 store_unavailable — none runs
    again.  Once it is back (empty: nothing is persisted) its keys are served again."""
    stage = {"idempotency": {"store": "shared"}}
    setups = [
        gateways.config(name, upstream.url, [stage], _stores(cluster)) for name in ("a", "b")
    ]
    a, b = [await gateways.start(setup) for setup in setups]
    upstream.mode = "slow:0.5"  # the first holds the lock while the others arrive
    answers = await asyncio.gather(
        *(post(a if i % 2 else b, "pay-1", headers="X-Test-Id: pay-1\r\n") for i in range(50))
    )
    assert upstream.executions["pay-1"] == 1
    assert {r.status for r in answers} <= {200, 409}
    upstream.mode = "ok"

    keys = [f"order-{n}" for n in range(24)]
    for n, key in enumerate(keys):
        first = await post(a if n % 2 else b, key, headers=f"X-Test-Id: {key}\r\n")
        assert first.status == 200
    # each record's Redis key, and the master serving its slot
    names = {key: _record_name(cluster, key) for key in keys}
    holder = {key: cluster.owner_of(name) for key, name in names.items()}
    assert set(holder.values()) == {0, 1, 2}
    cluster.stop_node(2)
    for port in (a, b):
        for key in keys:
            again = await post(port, key, headers=f"X-Test-Id: {key}\r\n")
            if holder[key] == 2:
                assert (again.status, code(again)) == (503, "store_unavailable"), key
            else:
                assert (again.status, again.header("Idempotent-Replayed")) == (200, "true")
    assert all(upstream.executions[key] == 1 for key in keys)
    assert upstream.executions["pay-1"] == 1

    cluster.start_node(2)
    # a new key whose record that master serves: 503 until each worker's back-off for it (at
    # most a second) has passed, then run once
    lost = next(key for key in keys if holder[key] == 2)
    fresh = next(
        candidate
        for candidate in (f"new-{n}" for n in range(1000))
        if cluster.owner_of(names[lost].replace(lost, candidate)) == 2
    )
    deadline = time.monotonic() + 10
    while True:
        after = await post(a, fresh, headers=f"X-Test-Id: {fresh}\r\n")
        if after.status != 503 or time.monotonic() > deadline:
            break
        assert code(after) == "store_unavailable"
        await asyncio.sleep(0.05)
    assert after.status == 200
    assert upstream.executions[fresh] == 1


def _record_name(cluster: RedisClusterServers, key: str) -> str:
    """The Redis key of idempotency key `key`'s record, found on whichever master holds it."""
    found = [
        name
        for node in cluster.nodes
        for name in node.command("KEYS", f"*{key}").split()
        if name.endswith(f":{key}")
    ]
    assert len(found) == 1, (key, found)
    return found[0]
