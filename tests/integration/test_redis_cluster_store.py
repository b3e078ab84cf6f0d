"""The redis store on a Redis Cluster (`cluster: true, nodes: [...]`), against real three-master
clusters on 127.0.0.1 (tests/support/redis_cluster.py): records spread over every master, a
master stopped, paused, restarted, and marked failed, a slot moved under the client, a store built
from the config with a password, a one-node TLS cluster, and a fake node that breaks the
connection under a script (which must never be sent twice).

The records' contract itself runs on a cluster too: the "cluster" param of
test_idempotency_store_contract.py.  Every test is bounded by a timeout mark that covers its
fixtures (a cluster starts in ~2 s; a stopped master is marked failed after the node timeout,
2 s here).  Nothing sleeps hoping: every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import pytest
import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from gateway.config.model import StoreTLSConfig
from gateway.stores.base import (
    IN_USE,
    NEW,
    REPLAY,
    UNKNOWN,
    Begin,
    RecordsMeter,
    StoredResponse,
    StoreError,
)
from gateway.stores.redis import BACKOFF_MAX, RedisIdempotencyRecords, RedisStore
from tests.support.config import parse_config
from tests.support.process import free_port
from tests.support.redis_cluster import RedisClusterServers
from tests.support.redis_tls import TLSRedisServer

#: a store's timeout in these tests: long enough for a loaded machine, short enough to measure
TIMEOUT = 0.5
#: what an operation may take beyond the store's timeout before the test calls it unbounded
SLACK = 0.3
#: a lock's ttl: longer than any test, however loaded the machine
LOCK = 600
#: the lock ttl of a `begin` expected to fail, which the store then gives up in the background
#: for at most that long: short, since closing the store may wait for it (see _aclose)
GIVE_UP = 1.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """One cluster for the tests that leave every node running."""
    servers = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A cluster of the test's own, for a test that stops, pauses or reconfigures a node."""
    servers = RedisClusterServers(tmp_path / "redis-cluster").start()
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture
async def node_clients(cluster: RedisClusterServers) -> AsyncIterator[list[Redis]]:
    """A plain client per node of the module's cluster: it sees only what that node holds."""
    clients = _plain_clients(cluster)
    try:
        yield clients
    finally:
        for client in clients:
            await client.aclose()


def _plain_clients(cluster: RedisClusterServers) -> list[Redis]:
    return [Redis.from_url(url, socket_timeout=5) for url in cluster.urls]


def _records(store: RedisStore, namespace: str | None = None) -> RedisIdempotencyRecords:
    records = store.idempotency(
        namespace=namespace or uuid.uuid4().hex, max_keys=1, max_bytes=1, meter=RecordsMeter()
    )
    assert isinstance(records, RedisIdempotencyRecords)
    return records


def _slot_ranges(cluster: RedisClusterServers, via: int = 0) -> list[tuple[int, int, int]]:
    """(first slot, last slot, node index) for every range CLUSTER NODES assigns, as node
    `via` sees them."""
    ranges: list[tuple[int, int, int]] = []
    for line in cluster.nodes[via].command("CLUSTER", "NODES").splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        for item in fields[8:]:
            if not item.startswith("["):  # [slot->-id] is a migration, not an assignment
                first, _, last = item.partition("-")
                ranges.append((int(first), int(last or first), cluster.ports.index(port)))
    return ranges


def _owner(ranges: list[tuple[int, int, int]], slot: int) -> int:
    return next(index for first, last, index in ranges if first <= slot <= last)


def _keys_by_node(
    cluster: RedisClusterServers, records: RedisIdempotencyRecords, per_node: int = 1
) -> list[list[str]]:
    """For each node, `per_node` idempotency keys whose records that node holds."""
    ranges = _slot_ranges(cluster)
    keys: list[list[str]] = [[] for _ in cluster.nodes]
    number = 0
    while any(len(found) < per_node for found in keys):
        key = f"key-{number}"
        found = keys[_owner(ranges, key_slot(records.key_name(key).encode()))]
        if len(found) < per_node:
            found.append(key)
        number += 1
    # the server hashes the records' names as the client does
    for index, found in enumerate(keys):
        for key in found:
            slot = int(cluster.nodes[0].command("CLUSTER", "KEYSLOT", records.key_name(key)))
            assert _owner(ranges, slot) == index
    return keys


async def _aclose(store: RedisStore) -> None:
    """Close the store, then every connection its client may have left open anyway: a test
    whose store leaked them would hang in the event loop's close (uvloop's) instead of failing.

    Closing waits for the locks the store gives up in the background, which a cancellation
    does not always stop (Python 3.11's wait_for, in redis-py's send, can swallow it): each
    then runs out its lock ttl, GIVE_UP in these tests."""
    async with asyncio.timeout(GIVE_UP + 10):
        await store.aclose()
    client = store.client
    if isinstance(client, RedisCluster):
        manager = client.nodes_manager
        for node in [*manager.nodes_cache.values(), *manager.startup_nodes.values()]:
            await node.disconnect()


async def _fails_within(operation: Awaitable[object], bound: float) -> float:
    """`operation` raises StoreError within `bound` seconds; the seconds it took."""
    started = time.monotonic()
    with pytest.raises(StoreError) as raised:
        await operation
    elapsed = time.monotonic() - started
    assert elapsed < bound, elapsed
    assert "store 'shared' (cluster redis" in str(raised.value)
    return elapsed


async def _once_back(records: RedisIdempotencyRecords, key: str) -> Begin:
    """`begin(key)` once the master serving `key` answers again: until the store's back-off
    for it ends (at most BACKOFF_MAX after its last failure) it fails at once, untried."""
    deadline = time.monotonic() + BACKOFF_MAX + 2 * TIMEOUT + SLACK
    while True:
        try:
            return await records.begin(key, "fp", LOCK)
        except StoreError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{key} still fails: {exc}") from exc
        await asyncio.sleep(0.02)


def _flag_of(cluster: RedisClusterServers, via: int, index: int) -> str:
    """The flags node `via` gives node `index` in CLUSTER NODES (`master`, `master,fail` …)."""
    port = cluster.ports[index]
    for line in cluster.nodes[via].command("CLUSTER", "NODES").splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[1].startswith(f"127.0.0.1:{port}@"):
            return fields[2]
    return ""


def _wait_marked_failed(cluster: RedisClusterServers, index: int, by: list[int]) -> None:
    """Poll until every node in `by` flags node `index` as failed (not just suspected)."""
    deadline = time.monotonic() + 20
    while not all("fail" in _flag_of(cluster, via, index).split(",") for via in by):
        assert time.monotonic() < deadline, [_flag_of(cluster, via, index) for via in by]
        time.sleep(0.05)


# -- every master holds records -----------------------------------------------------------


@pytest.mark.timeout(45)
async def test_records_of_different_keys_land_on_all_three_masters(
    cluster: RedisClusterServers, node_clients: list[Redis]
) -> None:
    store = RedisStore("shared", nodes=cluster.urls, prefix="spread:", timeout=TIMEOUT)
    try:
        records = _records(store)
        keys = [f"order-{n}" for n in range(30)]
        assert [(await records.begin(k, "fp", LOCK)).outcome for k in keys] == [NEW] * 30
        assert [(await records.begin(k, "fp", LOCK)).outcome for k in keys] == [IN_USE] * 30
    finally:
        await _aclose(store)
    names = {records.key_name(k).encode() for k in keys}
    ranges = _slot_ranges(cluster)
    held = []
    for index, node in enumerate(node_clients):
        mine = set(await node.keys(records.key_name("*")))
        for name in mine:  # each record sits on the master of its slot, as the server hashes it
            assert _owner(ranges, await node.cluster("KEYSLOT", name)) == index
        held.append(mine)
    assert all(held), [len(h) for h in held]  # 30 keys: every master got some
    assert set.union(*held) == names
    assert sum(len(h) for h in held) == len(names)  # none on two masters


# -- a node down ----------------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_a_master_down_fails_its_keys_only_and_the_same_store_recovers(
    own_cluster: RedisClusterServers,
) -> None:
    """With `cluster-require-full-coverage no`, the masters left serve their slots while one is
    down: the store's operations on keys in the missing master's slots fail as StoreError within
    the timeout (paused: at the timeout; stopped: at once), every other key works — including
    scripts that master's peers had never run — and once it is back the same store object
    serves its keys again."""
    for node in own_cluster.nodes:
        node.command("CONFIG", "SET", "cluster-require-full-coverage", "no")
    store = RedisStore("shared", nodes=own_cluster.urls, timeout=TIMEOUT)
    namespace = uuid.uuid4().hex
    try:
        records = _records(store, namespace)
        (a0, b0, _), (a1, b1, c1), (a2, b2, c2) = _keys_by_node(own_cluster, records, 3)
        for key in (a0, a1, a2):
            assert (await records.begin(key, "fp", LOCK)).outcome == NEW

        # paused (SIGSTOP: connections are accepted, nothing is answered): the timeout bounds it
        own_cluster.nodes[2].pause()
        try:
            elapsed = await _fails_within(records.begin(b2, "fp", GIVE_UP), TIMEOUT + SLACK)
            assert elapsed >= TIMEOUT * 0.9
            assert (await records.begin(a0, "fp", LOCK)).outcome == IN_USE
            assert (await records.begin(b1, "fp", LOCK)).outcome == NEW
        finally:
            own_cluster.nodes[2].resume()

        # stopped: refused at once, whether or not the others have marked it failed yet
        own_cluster.stop_node(2)
        await _fails_within(records.begin(c2, "fp", GIVE_UP), TIMEOUT + SLACK)
        assert (await records.begin(b0, "fp", LOCK)).outcome == NEW
        # the first `complete` anywhere: the script is on no master yet, and while one is down
        # SCRIPT LOAD (to every master) would fail; it is loaded on its key's master alone
        await records.complete(a0, StoredResponse(201, [(b"X-Id", b"1")], b"made"), ttl=LOCK)
        _wait_marked_failed(own_cluster, 2, by=[0, 1])
        await _fails_within(records.begin(c2, "fp", GIVE_UP), TIMEOUT + SLACK)
        # a release never fails the request (the lock expires with its ttl): bounded all the same
        started = time.monotonic()
        await records.release(a2)
        assert time.monotonic() - started < TIMEOUT + SLACK
        replay = await records.begin(a0, "fp", LOCK)
        assert replay.outcome == REPLAY
        assert replay.response is not None
        assert (replay.response.status, replay.response.body) == (201, b"made")
        await records.mark_unknown(a1, "fp", ttl=LOCK)  # the first mark_unknown, likewise
        assert (await records.begin(a1, "fp", LOCK)).outcome == UNKNOWN
        assert (await records.begin(c1, "fp", LOCK)).outcome == NEW

        # a store closed right after a failure (a reload retiring it) closes its connections
        # to the masters left: redis-py's own aclose skips them then
        plain = _plain_clients(own_cluster)[:2]
        retired = RedisStore("shared", nodes=own_cluster.urls, timeout=TIMEOUT)
        try:
            before = [int((await c.info("clients"))["connected_clients"]) for c in plain]
            other = _records(retired, namespace + "-retired")
            [d0], [d1], [d2] = _keys_by_node(own_cluster, other)
            assert (await other.begin(d0, "fp", LOCK)).outcome == NEW
            assert (await other.begin(d1, "fp", LOCK)).outcome == NEW
            await _fails_within(other.begin(d2, "fp", GIVE_UP), TIMEOUT + SLACK)
            await retired.aclose()
            await _until_connected(plain, before)
        finally:
            await _aclose(retired)
            for client in plain:
                await client.aclose()

        # back (on its ports, as itself, empty): the same store, never rebuilt, serves it again
        own_cluster.start_node(2)
        # its keys fail at once until that master's back-off ends (at most BACKOFF_MAX)
        assert (await _once_back(records, c2)).outcome == NEW
        assert (await records.begin(c2, "fp", LOCK)).outcome == IN_USE
        assert (await records.begin(a2, "fp", LOCK)).outcome == NEW  # its records were lost
        assert (await records.begin(a0, "fp", LOCK)).outcome == REPLAY  # the others' were not
        await store.ping()
    finally:
        await _aclose(store)


@pytest.mark.timeout(90)
async def test_a_new_store_works_while_any_one_master_is_down(
    own_cluster: RedisClusterServers,
) -> None:
    """A gateway started (or a store rebuilt by a reload) while a master is down: the new
    client learns the slots from a master that answers and serves the others' keys, whichever
    master is missing — redis-py's own client asked the first master it listed for COMMAND,
    and failed every operation while that one was down."""
    finder = RedisStore("shared", nodes=own_cluster.urls)
    namespaces = [uuid.uuid4().hex for _ in own_cluster.nodes]
    keys = [
        [found[0] for found in _keys_by_node(own_cluster, _records(finder, namespace))]
        for namespace in namespaces
    ]
    await _aclose(finder)
    for down, namespace in enumerate(namespaces):
        for node in own_cluster.nodes:
            node.command("CONFIG", "SET", "cluster-require-full-coverage", "no")
        own_cluster.stop_node(down)
        store = RedisStore("shared", nodes=own_cluster.urls, timeout=TIMEOUT)
        try:
            records = _records(store, namespace)
            for index, key in enumerate(keys[down]):
                if index == down:
                    await _fails_within(records.begin(key, "fp", GIVE_UP), TIMEOUT + SLACK)
                else:
                    assert (await records.begin(key, "fp", LOCK)).outcome == NEW
                    assert (await records.begin(key, "fp", LOCK)).outcome == IN_USE
        finally:
            await _aclose(store)
        own_cluster.start_node(down)


@pytest.mark.timeout(90)
async def test_with_full_coverage_required_every_key_fails_until_the_master_is_back(
    own_cluster: RedisClusterServers,
) -> None:
    """Redis's default, `cluster-require-full-coverage yes`: once the other masters have marked
    a master without replicas failed, the whole cluster refuses (CLUSTERDOWN), so every key
    fails as StoreError within the timeout; the same store works again once it is back."""
    store = RedisStore("shared", nodes=own_cluster.urls, timeout=TIMEOUT)
    try:
        records = _records(store)
        (k0,), (k1,), (k2,) = _keys_by_node(own_cluster, records)
        for key in (k0, k1, k2):
            assert (await records.begin(key, "fp", LOCK)).outcome == NEW
        own_cluster.stop_node(2)
        own_cluster.wait_state("fail", timeout=20, nodes=[0, 1])
        for key in (k0, k1, k2):
            await _fails_within(records.begin(key, "fp", GIVE_UP), TIMEOUT + SLACK)
        with pytest.raises(StoreError, match="ClusterDownError"):
            await records.begin(k0, "fp", GIVE_UP)
        # many at once (and the locks given up in the background): each a StoreError, the
        # CLUSTERDOWN of one never closing the connections of the others under them (which
        # redis-py did: they failed with "Connection closed by server", "Connection lost"
        # while writing, and some with a RuntimeError).  A store of their own, closed after:
        # its 120 locks given up in the background are not the main store's to wait for
        refused = f"Error 111 connecting to 127.0.0.1:{own_cluster.ports[2]}."  # its keys
        expected = ("ClusterDownError: ", refused, f"no answer within {TIMEOUT * 1000:g} ms")
        burst = RedisStore("shared", nodes=own_cluster.urls, timeout=TIMEOUT)
        try:
            many = _records(burst)
            for _ in range(3):
                failures = await asyncio.gather(
                    *(many.begin(f"x{n}", "fp", GIVE_UP) for n in range(40)), return_exceptions=True
                )
                assert [type(f) for f in failures] == [StoreError] * 40
                odd = {str(f) for f in failures if not any(e in str(f) for e in expected)}
                assert not odd, odd
        finally:
            await _aclose(burst)
        own_cluster.start_node(2)
        assert (await _once_back(records, k0)).outcome == IN_USE
        assert (await _once_back(records, k1)).outcome == IN_USE
        assert (await _once_back(records, k2)).outcome == NEW  # back empty
    finally:
        await _aclose(store)


# -- the client follows the cluster -----------------------------------------------------------


@pytest.mark.timeout(45)
async def test_a_slot_moved_to_another_master_is_followed_and_run_once(
    cluster: RedisClusterServers, node_clients: list[Redis]
) -> None:
    """The store's slot table is out of date: the old master answers MOVED (running nothing),
    the client sends the script to the new one, which runs it once."""
    store = RedisStore("shared", nodes=cluster.urls, timeout=TIMEOUT)
    try:
        records = _records(store)
        await store.ping()  # the client has read the slots
        [key], [other], _ = _keys_by_node(cluster, records)
        name = records.key_name(key)
        slot = key_slot(name.encode())
        assert await node_clients[0].cluster("COUNTKEYSINSLOT", slot) == 0
        new_owner = cluster.node_id(1)
        for node in (node_clients[1], node_clients[0], node_clients[2]):  # the new owner first
            await node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", new_owner)
        with pytest.raises(redis.exceptions.MovedError):
            await node_clients[0].exists(name)
        assert (await records.begin(key, "fp", LOCK)).outcome == NEW
        assert (await records.begin(key, "fp", LOCK)).outcome == IN_USE
        assert await node_clients[1].exists(name) == 1
        assert (await records.begin(other, "fp", LOCK)).outcome == NEW  # the rest of node 0's
    finally:
        await _aclose(store)


@pytest.mark.timeout(45)
async def test_many_operations_at_once_on_a_new_store_all_succeed(
    cluster: RedisClusterServers,
) -> None:
    """redis-py routes commands issued before it has read the slots to random masters; their
    MOVED replies, five at a time, made it close every connection under the others in flight.
    The store reads the slots first: no master answers MOVED at all."""
    clients = _plain_clients(cluster)

    async def moved() -> int:
        stats = [await client.info("errorstats") for client in clients]
        return sum(int(s.get("errorstat_MOVED", {}).get("count", 0)) for s in stats)

    try:
        before = await moved()
        for _ in range(3):
            store = RedisStore("shared", nodes=cluster.urls, timeout=2.0)
            try:
                records = _records(store)
                outcomes = await asyncio.gather(
                    *(records.begin(f"k{n % 10}", "fp", LOCK) for n in range(60))
                )
                assert sorted(o.outcome for o in outcomes) == sorted([NEW] * 10 + [IN_USE] * 50)
            finally:
                await _aclose(store)
        assert await moved() == before
    finally:
        for client in clients:
            await client.aclose()


# -- built from the config ------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_store_from_the_config_with_a_password_works_on_every_master(
    own_cluster: RedisClusterServers,
) -> None:
    """`cluster: true, nodes: [...]` with the password from ${ENV} in each url: the client uses
    it on the masters it discovers too; a wrong one is a store error that shows neither."""
    nodes = own_cluster.urls
    namespace = uuid.uuid4().hex
    # a key on each master, found while redis-cli needs no password yet (no connection made)
    finder = RedisStore("shared", nodes=nodes)
    keys = [found[0] for found in _keys_by_node(own_cluster, _records(finder, namespace))]
    await _aclose(finder)
    for node in own_cluster.nodes:
        node.command("CONFIG", "SET", "requirepass", "s3cret-pw")
    listed = ", ".join(
        f"'{url.replace('redis://', 'redis://:${REDIS_PASSWORD}@')}'" for url in nodes
    )
    text = (
        'listeners: [{name: http, bind: "127.0.0.1:0"}]\n'
        f"stores:\n  shared: {{cluster: true, nodes: [{listed}], timeout: 1s, pool_size: 4}}\n"
    )
    [config] = parse_config(text, env={"REDIS_PASSWORD": "s3cret-pw"}).stores
    assert config.cluster
    assert config.nodes[0].startswith("redis://:s3cret-pw@127.0.0.1:")
    store = RedisStore.from_config(config)
    assert store.config == config
    assert store.shown_url == f"cluster redis://***@127.0.0.1:{own_cluster.ports[0]}/0 +2"
    try:
        await store.ping()
        records = _records(store, namespace)
        assert [(await records.begin(k, "fp", LOCK)).outcome for k in keys] == [NEW] * 3
        assert [(await records.begin(k, "fp", LOCK)).outcome for k in keys] == [IN_USE] * 3
    finally:
        await _aclose(store)

    [wrong] = parse_config(text, env={"REDIS_PASSWORD": "not-it"}).stores
    store = RedisStore.from_config(wrong)
    try:
        with pytest.raises(StoreError) as raised:
            await store.ping()
        message = str(raised.value)
        assert f"(cluster redis://***@127.0.0.1:{own_cluster.ports[0]}/0 +2)" in message
        assert "not-it" not in message
        assert "s3cret" not in message
    finally:
        await _aclose(store)


@pytest.mark.timeout(30)
async def test_no_reachable_seed_is_a_store_error_at_once() -> None:
    """redis-py says so with RedisClusterException, which is no RedisError."""
    ports = [free_port(), free_port()]
    store = RedisStore(
        "shared", nodes=[f"redis://:hunter2@127.0.0.1:{p}" for p in ports], timeout=TIMEOUT
    )
    try:
        started = time.monotonic()
        with pytest.raises(StoreError) as raised:
            await store.ping()
        assert time.monotonic() - started < TIMEOUT + SLACK
        message = str(raised.value)
        assert f"(cluster redis://***@127.0.0.1:{ports[0]} +1)" in message
        assert "RedisClusterException" in message
        assert "hunter2" not in message
        records = _records(store)
        await _fails_within(records.begin("k", "fp", GIVE_UP), TIMEOUT + SLACK)
    finally:
        await _aclose(store)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "failure",
    [
        redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
        redis.exceptions.SlotNotCoveredError('Slot "12" not covered by the cluster.'),
        redis.exceptions.RedisClusterException("Redis Cluster cannot be connected."),
        redis.exceptions.ClusterError("TTL exhausted."),
        redis.exceptions.MovedError("3999 127.0.0.1:6381"),
        redis.exceptions.TryAgainError("TRYAGAIN"),
        redis.exceptions.MaxConnectionsError("Too many connections"),
        redis.exceptions.ConnectionError("Connection closed by server."),
        redis.exceptions.TimeoutError("Timeout reading from 127.0.0.1:6381"),
    ],
    ids=lambda failure: type(failure).__name__,
)
async def test_every_failure_of_the_cluster_client_is_a_store_error(
    failure: Exception,
) -> None:
    store = RedisStore("shared", nodes=["redis://127.0.0.1:1", "redis://127.0.0.1:2"])

    async def fails() -> None:
        raise failure

    try:
        with pytest.raises(StoreError, match=type(failure).__name__) as raised:
            await store.run(fails())
        assert raised.value.__cause__ is failure
    finally:
        await _aclose(store)


# -- the pool ----------------------------------------------------------------------------------


@pytest.mark.timeout(45)
async def test_pool_size_bounds_the_connections_to_each_master_and_aclose_ends_them(
    cluster: RedisClusterServers, node_clients: list[Redis]
) -> None:
    async def connected(index: int) -> int:
        info = await node_clients[index].info("clients")
        return int(info["connected_clients"])

    before = [await connected(i) for i in range(3)]
    store = RedisStore("shared", nodes=cluster.urls, timeout=2.0, pool_size=2)
    try:
        await store.ping()
        records = _records(store)
        keys = _keys_by_node(cluster, records, per_node=8)
        outcomes = await asyncio.gather(
            *(records.begin(k, "fp", LOCK) for found in keys for k in found), return_exceptions=True
        )
        done = [o for o in outcomes if not isinstance(o, BaseException)]
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        assert done
        assert refused  # beyond the pool: refused at once, as the single-node client does
        assert all(isinstance(o, StoreError) and "MaxConnectionsError" in str(o) for o in refused)
        for index in range(3):
            # the pool's two, and the seed's own connection that read the slots
            assert await connected(index) - before[index] <= 2 + 1
    finally:
        await _aclose(store)
    await _until_connected(node_clients, before)


async def _until_connected(clients: list[Redis], most: list[int]) -> None:
    """Poll until node i has at most most[i] clients connected (CLIENT LIST's view)."""
    deadline = time.monotonic() + 10
    while True:
        now = [int((await c.info("clients"))["connected_clients"]) for c in clients]
        if all(n <= m for n, m in zip(now, most, strict=True)):
            return
        assert time.monotonic() < deadline, (now, most)
        await asyncio.sleep(0.02)


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture
def tls_cluster_node(tmp_path: Path) -> Iterator[TLSRedisServer]:
    """A one-master cluster that speaks only TLS, the cluster bus included, serving every slot:
    what the client discovers through it is reached with the store's TLS settings too."""
    server = TLSRedisServer(
        tmp_path / "redis-tls-cluster",
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-port",
        str(free_port()),
        "--tls-cluster",
        "yes",
    ).start()
    try:
        server.command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        deadline = time.monotonic() + 20
        while "cluster_state:ok" not in server.command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, server.command("CLUSTER", "INFO")
            time.sleep(0.05)
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(45)
async def test_a_tls_cluster_with_the_ca_and_a_client_certificate(
    tls_cluster_node: TLSRedisServer,
) -> None:
    node = tls_cluster_node
    tls = StoreTLSConfig(ca=str(node.ca), cert=str(node.client_cert), key=str(node.client_key))
    store = RedisStore("shared", nodes=[node.url], tls=tls, timeout=2.0)
    try:
        records = _records(store)
        assert (await records.begin("k", "fp", LOCK)).outcome == NEW
        assert (await records.begin("k", "fp", LOCK)).outcome == IN_USE
    finally:
        await _aclose(store)
    # without the client certificate the node refuses the handshake
    store = RedisStore("shared", nodes=[node.url], tls=StoreTLSConfig(ca=str(node.ca)))
    try:
        with pytest.raises(StoreError, match=r"cluster rediss://127\.0\.0\.1"):
            await store.ping()
    finally:
        await _aclose(store)


# -- never twice ---------------------------------------------------------------------------


@pytest.mark.timeout(15)
async def test_a_script_whose_connection_broke_is_never_sent_again_on_a_cluster() -> None:
    """A fault a real cluster cannot make on demand: a node that owns every slot, answers the
    client's handshake and topology questions, reads the first script and closes the
    connection.  The store fails the operation and never sends the script again (redis-py's
    cluster client, by default, reads the slots again and resends it up to three times)."""
    scripts = 0
    node_id = b"f" * 40
    connections: set[asyncio.StreamWriter] = set()
    none_open = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal scripts
        port = writer.get_extra_info("sockname")[1]
        connections.add(writer)
        try:
            while line := await reader.readline():
                if not line.startswith(b"*"):
                    continue
                parts = []
                for _ in range(int(line[1:])):
                    await reader.readline()  # $<length>
                    parts.append((await reader.readline()).strip())
                command = b" ".join(parts[:2]).upper()
                if parts[0].upper() in (b"EVALSHA", b"EVAL"):
                    # the begin's (its first argument is the fingerprint), not the lock given
                    # up in the background afterwards
                    scripts += parts[4:5] == [b"fp"]
                    return  # closes the connection with the script unanswered
                if command.startswith(b"HELLO"):
                    writer.write(b"%1\r\n$5\r\nproto\r\n:3\r\n")
                elif command == b"CLUSTER SLOTS":
                    writer.write(
                        b"*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n"
                        + b":%d\r\n$40\r\n%b\r\n" % (port, node_id)
                    )
                elif command == b"COMMAND":
                    writer.write(b"*0\r\n")
                else:
                    writer.write(b"+OK\r\n")  # CLIENT SETINFO and the like
        finally:
            connections.discard(writer)
            writer.close()
            if not connections:
                none_open.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore("shared", nodes=[f"redis://127.0.0.1:{port}"], timeout=2.0)
    try:
        await store.ping()
        await _fails_within(_records(store).begin("k", "fp", GIVE_UP), 2.5)
        assert scripts == 1
    finally:
        await store.aclose()
        # closed after a connection error too: the client's other connections end
        if connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(none_open.wait(), 5)
        left = len(connections)
        await _aclose(store)
        for writer in list(connections):
            writer.close()
        server.close()
        await server.wait_closed()
    assert left == 0
