"""The real-redis fixtures work with the real client: a TLS-only server that asks for a client
certificate (tests/support/redis_tls.py), and a three-master cluster (redis_cluster.py).

Every server is a real process on 127.0.0.1; every test is bounded by a pytest-timeout mark that
covers its fixtures' setup too (the cluster's ~2 s start lands on the first test using it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tests.support.certs import TestCA
from tests.support.redis_cluster import RedisClusterServers
from tests.support.redis_tls import AuthClients, TLSRedisServer

#: a refused connection must fail now, not after redis-py's default backoff-and-retry
NO_RETRY = Retry(NoBackoff(), 0)

#: sets two keys and reads both back: one script, so both keys must be in one slot
TWO_KEY_SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2])}
"""


# --- TLS ---------------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TLSRedisServer]:
    server = TLSRedisServer(tmp_path / "redis-tls").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def other_ca(tmp_path: Path) -> TestCA:
    """A CA that signed nothing the server knows: neither its certificate nor its CA."""
    directory = tmp_path / "other-ca"
    directory.mkdir()
    return TestCA(directory, "other-ca")


def tls_client(url: str, ca: Path, cert: Path | None = None, key: Path | None = None) -> Redis:
    return Redis.from_url(
        url,
        ssl_ca_certs=str(ca),
        ssl_certfile=None if cert is None else str(cert),
        ssl_keyfile=None if key is None else str(key),
        retry=NO_RETRY,
        socket_connect_timeout=5,
        socket_timeout=5,
        decode_responses=True,
    )


@pytest.fixture
async def tls_trusted(tls_server: TLSRedisServer) -> AsyncIterator[Redis]:
    """A client trusting the server's CA and presenting the client certificate it signed."""
    client = tls_client(
        tls_server.url, tls_server.ca, tls_server.client_cert, tls_server.client_key
    )
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.timeout(15)
async def test_tls_client_with_certificate_sets_and_gets(
    tls_server: TLSRedisServer, tls_trusted: Redis
) -> None:
    assert tls_server.url.startswith("rediss://127.0.0.1:")
    assert await tls_trusted.set("greeting", "hello") is True
    assert await tls_trusted.get("greeting") == "hello"
    # the only way in is TLS: the plain port is off and the TLS port is the url's
    assert await tls_trusted.config_get("port") == {"port": "0"}
    assert await tls_trusted.config_get("tls-port") == {"tls-port": str(tls_server.port)}
    assert await tls_trusted.config_get("tls-auth-clients") == {"tls-auth-clients": "yes"}


@pytest.mark.timeout(15)
@pytest.mark.parametrize("offered", ["none", "signed by another CA"])
async def test_tls_refuses_a_client_without_a_trusted_certificate(
    tls_server: TLSRedisServer, tls_trusted: Redis, other_ca: TestCA, offered: str
) -> None:
    if offered == "none":
        client = tls_client(tls_server.url, tls_server.ca)
        alert = "CERTIFICATE_REQUIRED"  # TLS 1.3's alert for an empty client Certificate
    else:
        foreign = other_ca.issue("foreign-client", client=True)
        client = tls_client(tls_server.url, tls_server.ca, foreign.cert, foreign.key)
        alert = "UNKNOWN_CA"
    try:
        # the server's alert reaches the client as redis-py's ConnectionError (not a
        # ResponseError: no command was ever answered) — or a reset: in TLS 1.3 the client's
        # SET may already be on its way when the server refuses the certificate, and a server
        # closing with unread bytes resets the connection, which can discard the alert before
        # the client reads it (seen once in a clean-clone run)
        with pytest.raises(
            redis.exceptions.ConnectionError, match=f"{alert}|Connection reset by peer"
        ):
            await client.set("intruder", "was-here")
    finally:
        await client.aclose()
    # the handshake failed before the SET could run
    assert await tls_trusted.get("intruder") is None


@pytest.mark.timeout(15)
async def test_tls_client_refuses_a_server_its_ca_did_not_sign(
    tls_server: TLSRedisServer, tls_trusted: Redis, other_ca: TestCA
) -> None:
    # a valid client certificate, so only the client's own check can fail
    client = tls_client(
        tls_server.url, other_ca.path, tls_server.client_cert, tls_server.client_key
    )
    try:
        with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.set("unchecked", "sent")
    finally:
        await client.aclose()
    assert await tls_trusted.get("unchecked") is None


@pytest.mark.timeout(15)
@pytest.mark.parametrize("auth_clients", ["optional", "no"])
async def test_tls_auth_clients_optional_or_no(
    tmp_path: Path, other_ca: TestCA, auth_clients: AuthClients
) -> None:
    server = TLSRedisServer(tmp_path / "redis-tls", auth_clients=auth_clients).start()
    foreign = other_ca.issue("foreign-client", client=True)
    bare = tls_client(server.url, server.ca)
    with_foreign = tls_client(server.url, server.ca, foreign.cert, foreign.key)
    try:
        # neither mode requires a certificate
        assert await bare.set("k", "v") is True
        assert await bare.get("k") == "v"
        if auth_clients == "optional":
            # … but `optional` still checks one that is offered
            with pytest.raises(redis.exceptions.ConnectionError, match="UNKNOWN_CA"):
                await with_foreign.get("k")
        else:
            # while `no` never asks, so an untrusted one is never looked at
            assert await with_foreign.get("k") == "v"
    finally:
        await bare.aclose()
        await with_foreign.aclose()
        server.stop()


# --- cluster -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    # module scope: starting and joining three nodes takes ~2 s; start() stops them if it fails
    servers = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture
async def cluster_client(cluster: RedisClusterServers) -> AsyncIterator[RedisCluster]:
    client = RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", port) for port in cluster.ports],
        decode_responses=True,
    )
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def node_clients(cluster: RedisClusterServers) -> AsyncIterator[list[Redis]]:
    """One plain (not cluster-aware) client per node: it sees only what that node holds."""
    clients = [
        Redis.from_url(url, retry=NO_RETRY, socket_timeout=5, decode_responses=True)
        for url in cluster.urls
    ]
    try:
        yield clients
    finally:
        for client in clients:
            await client.aclose()


def owner_port(client: RedisCluster, key: str) -> int:
    """The port of the node the client's slot table sends `key` to."""
    node = client.get_node_from_key(key)
    assert node is not None, f"no node serves {key!r}'s slot"
    return int(node.port)


async def one_key_per_node(client: RedisCluster) -> dict[int, str]:
    """Node port → a key whose slot that node serves, by the client's slot table (the tests
    check the servers agree)."""
    await client.initialize()
    keys: dict[int, str] = {}
    for number in range(1000):
        key = f"key:{number}"
        keys.setdefault(owner_port(client, key), key)
        if len(keys) == 3:
            break
    return keys


@pytest.mark.timeout(45)
async def test_cluster_has_three_masters_sharing_every_slot(
    cluster: RedisClusterServers, node_clients: list[Redis]
) -> None:
    for index, node in enumerate(node_clients):
        info = cluster.info(index)
        assert info["cluster_state"] == "ok"
        assert info["cluster_known_nodes"] == "3"
        assert info["cluster_size"] == "3"  # masters serving at least one slot
        assert info["cluster_slots_assigned"] == "16384"
        assert (await node.role())[0] == "master"
    assert len({cluster.node_id(index) for index in range(3)}) == 3


@pytest.mark.timeout(45)
async def test_cluster_client_sets_and_gets_keys_on_all_three_masters(
    cluster: RedisClusterServers, cluster_client: RedisCluster, node_clients: list[Redis]
) -> None:
    keys = await one_key_per_node(cluster_client)
    assert sorted(keys) == sorted(cluster.ports)
    slots: dict[int, int] = {}
    for port, key in keys.items():
        # the client's CRC16 agrees with the server's, so its routing is the server's
        slots[port] = cluster_client.keyslot(key)
        assert await node_clients[0].cluster("KEYSLOT", key) == slots[port]
        assert await cluster_client.set(key, f"on-{port}") is True
    for port, key in keys.items():
        assert await cluster_client.get(key) == f"on-{port}"
    # each key is held by exactly the node the client sent it to: a plain client on that node
    # reads it, the other nodes redirect there
    for port, key in keys.items():
        for node_port, node in zip(cluster.ports, node_clients, strict=True):
            if node_port == port:
                assert await node.get(key) == f"on-{port}"
            else:
                with pytest.raises(redis.exceptions.MovedError) as moved:
                    await node.get(key)
                assert (moved.value.slot_id, moved.value.host) == (slots[port], "127.0.0.1")
                assert moved.value.port == port


@pytest.mark.timeout(45)
async def test_cluster_script_on_one_hash_tag_runs(
    cluster_client: RedisCluster, node_clients: list[Redis]
) -> None:
    # only the {t} between braces is hashed: both keys are in one slot
    slot = cluster_client.keyslot("{t}a")
    assert cluster_client.keyslot("{t}b") == slot
    assert await node_clients[0].cluster("KEYSLOT", "{t}b") == slot
    result = await cluster_client.eval(TWO_KEY_SCRIPT, 2, "{t}a", "{t}b", "x", "y")
    assert result == ["x", "y"]
    assert await cluster_client.get("{t}a") == "x"
    assert await cluster_client.get("{t}b") == "y"


@pytest.mark.timeout(45)
async def test_cluster_script_across_slots_is_refused(
    cluster: RedisClusterServers, cluster_client: RedisCluster, node_clients: list[Redis]
) -> None:
    # two keys in different slots *of the same node*: the rule is per slot, not per node
    await cluster_client.initialize()
    by_port: dict[int, list[str]] = {}
    for number in range(1000):
        key = f"script:{number}"
        by_port.setdefault(owner_port(cluster_client, key), []).append(key)
    port, candidates = next(iter(by_port.items()))
    first = candidates[0]
    second = next(
        k for k in candidates if cluster_client.keyslot(k) != cluster_client.keyslot(first)
    )
    # the cluster client refuses before sending anything
    with pytest.raises(redis.exceptions.RedisClusterException, match="same key slot"):
        await cluster_client.eval(TWO_KEY_SCRIPT, 2, first, second, "x", "y")
    # and the server refuses too, when a plain client sends it straight to the node owning both
    owner = node_clients[cluster.ports.index(port)]
    # (redis-py names the error by its CROSSSLOT code, and drops the code from the message)
    with pytest.raises(redis.exceptions.ClusterCrossSlotError, match="same slot"):
        await owner.eval(TWO_KEY_SCRIPT, 2, first, second, "x", "y")
    # (one EXISTS for both would itself be cross-slot)
    assert [await owner.exists(first), await owner.exists(second)] == [0, 0]


# --- a node going away and coming back ---------------------------------------------------


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A cluster of the test's own, for a test that stops one of its nodes."""
    servers = RedisClusterServers(tmp_path / "redis-cluster").start()
    try:
        yield servers
    finally:
        servers.stop()


@pytest.mark.timeout(60)
async def test_cluster_node_stops_and_rejoins_as_itself(own_cluster: RedisClusterServers) -> None:
    port = own_cluster.ports[2]
    node_id = own_cluster.node_id(2)
    nodes = [ClusterNode("127.0.0.1", p) for p in own_cluster.ports]
    client = RedisCluster(startup_nodes=nodes, decode_responses=True)
    try:
        key = (await one_key_per_node(client))[port]
        assert await client.set(key, "before") is True
    finally:
        await client.aclose()

    own_cluster.stop_node(2)
    # with no replica to promote, the other masters see slots go unserved and stop serving
    # (cluster-require-full-coverage) once they agree the node failed, after the node timeout
    own_cluster.wait_state("fail", timeout=20, nodes=[0, 1])

    own_cluster.start_node(2)  # returns once every node says cluster_state:ok again
    assert own_cluster.ports[2] == port
    assert own_cluster.node_id(2) == node_id  # its config file made it the same node

    client = RedisCluster(startup_nodes=nodes, decode_responses=True)
    try:
        assert client.keyslot(key) in range(10923, 16384)  # the third range: node 2's
        assert await client.get(key) is None  # it came back empty: nothing is persisted
        assert await client.set(key, "after") is True
        assert await client.get(key) == "after"
        assert owner_port(client, key) == port
    finally:
        await client.aclose()
