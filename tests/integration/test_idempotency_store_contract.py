"""The idempotency records' contract, run against every store: the memory store, the redis
store on a real `redis-server`, and the redis store on a real three-master Redis Cluster.  The
same outcomes in the same order, whichever store holds the records (SPEC §5.5); then what only
a shared store can show — two replicas racing one key, a record outliving the gateway that wrote
it, and Redis stopped, paused and restarted (the cluster's own: test_redis_cluster_store.py).

Times are real here (Redis keeps its own clock), so the expiry tests use TTLs of a few hundred
milliseconds and poll `begin` until the record is gone, with a deadline.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from gateway.stores.base import (
    IN_USE,
    NEW,
    REPLAY,
    REUSED,
    UNKNOWN,
    Begin,
    IdempotencyRecords,
    RecordsMeter,
    StoredResponse,
    StoreError,
)
from gateway.stores.memory import MemoryStore
from gateway.stores.redis import (
    RedisIdempotencyRecords,
    RedisStore,
    decode_headers,
    encode_headers,
)
from tests.support.redis_cluster import RedisClusterServers
from tests.support.redis_server import RedisServer

#: makes the records of the test's namespace (or of a `suffix`ed one): each call is another
#: replica's view of them (the memory store's calls share one worker's store)
Records = Callable[..., Awaitable[IdempotencyRecords]]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """Started by the first test of the "cluster" param (~2 s), stopped with the module."""
    servers = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture(params=["memory", "redis", "cluster"])
async def make_records(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[Records]:
    namespace = uuid.uuid4().hex
    stores: list[RedisStore] = []
    memory = MemoryStore()
    cluster: RedisClusterServers | None = None
    if request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")

    async def make(suffix: str = "") -> IdempotencyRecords:
        if request.param == "memory":
            store: MemoryStore | RedisStore = memory
        elif cluster is not None:
            store = RedisStore("shared", nodes=cluster.urls, timeout=2.0)
            stores.append(store)
        else:
            store = RedisStore("shared", redis_server.url, timeout=2.0)
            stores.append(store)
        return store.idempotency(
            namespace=namespace + suffix, max_keys=1000, max_bytes=1 << 20, meter=RecordsMeter()
        )

    yield make
    for store in stores:
        await store.aclose()


async def _until(records: IdempotencyRecords, outcome: str, within: float = 5.0) -> float:
    """Poll `begin` until it answers `outcome`; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        try:
            if (await records.begin("k", "fp", 30)).outcome == outcome:
                return time.monotonic() - started
        except StoreError:
            pass  # a store backing off after a failure: it tries again moments later
        await asyncio.sleep(0.02)
    raise AssertionError(f"begin never answered {outcome} within {within}s")


async def test_first_locks_duplicates_wait_then_replay(make_records: Records) -> None:
    records = await make_records()
    assert (await records.begin("k", "fp", lock_ttl=30)).outcome == NEW
    busy = await records.begin("k", "fp", lock_ttl=30)
    assert busy.outcome == IN_USE
    assert 29 < busy.retry_after <= 30
    assert (await records.begin("k", "other", lock_ttl=30)).outcome == REUSED
    headers = [(b"X-A", b"1"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2:3 \xff")]
    await records.complete("k", StoredResponse(201, headers, b"made\x00\r\n"), ttl=3600)
    replay = await records.begin("k", "fp", lock_ttl=30)
    assert replay.outcome == REPLAY
    assert replay.response is not None
    assert (replay.response.status, replay.response.body) == (201, b"made\x00\r\n")
    assert replay.response.headers == headers
    assert replay.response.replayable
    assert not replay.response.pending
    assert (await records.begin("k", "other", lock_ttl=30)).outcome == REUSED


async def test_exactly_one_of_many_concurrent_duplicates_goes_first(
    make_records: Records,
) -> None:
    """50 duplicates at once, spread over two replicas' views of the records (the memory store:
    one worker's)."""
    replicas = [await make_records(), await make_records()]
    outcomes: list[Begin] = await asyncio.gather(
        *(replicas[i % 2].begin("k", "fp", 30) for i in range(50))
    )
    assert [o.outcome for o in outcomes].count(NEW) == 1
    assert [o.outcome for o in outcomes].count(IN_USE) == 49


async def test_release_lets_the_client_try_again_but_never_drops_a_stored_answer(
    make_records: Records,
) -> None:
    records = await make_records()
    await records.begin("k", "fp", 30)
    await records.release("k")
    assert (await records.begin("k", "fp", 30)).outcome == NEW
    await records.complete("k", StoredResponse(200, [], b""), ttl=60)
    await records.release("k")
    assert (await records.begin("k", "fp", 30)).outcome == REPLAY


async def test_a_lock_nobody_ends_expires_after_its_ttl(make_records: Records) -> None:
    records = await make_records()
    assert (await records.begin("k", "fp", lock_ttl=0.3)).outcome == NEW
    waited = await _until(records, NEW)
    assert waited >= 0.2  # the lock held (Redis expires keys within ~1 ms of their time)


async def test_an_unknown_outcome_is_kept_for_the_ttl_and_never_released(
    make_records: Records,
) -> None:
    records = await make_records()
    await records.begin("k", "fp", lock_ttl=30)
    await records.mark_unknown("k", "fp", ttl=0.4)
    await records.release("k")  # a late release never frees an unknown outcome
    assert (await records.begin("k", "fp", 30)).outcome == UNKNOWN
    assert (await records.begin("k", "other", 30)).outcome == REUSED
    waited = await _until(records, NEW)
    assert waited >= 0.2


async def test_an_unknown_outcome_after_the_lock_expired_is_still_kept(
    make_records: Records,
) -> None:
    records = await make_records()
    await records.begin("k", "fp", lock_ttl=0.05)
    await _until(records, NEW)  # the lock expired (and this poll took a new one)
    await records.release("k")
    await records.mark_unknown("k", "fp", ttl=60)
    assert (await records.begin("k", "fp", 30)).outcome == UNKNOWN


async def test_a_streaming_response_can_be_released_a_complete_one_cannot(
    make_records: Records,
) -> None:
    records = await make_records()
    await records.begin("k", "fp", lock_ttl=30)
    await records.complete("k", StoredResponse(200, [], b"", pending=True), ttl=60)
    streaming = await records.begin("k", "fp", 30)
    assert streaming.outcome == REPLAY  # pending: the stage answers 409
    assert streaming.response is not None
    assert streaming.response.pending
    await records.release("k")
    assert (await records.begin("k", "fp", 30)).outcome == NEW
    await records.complete("k", StoredResponse(200, [], b"done"), ttl=60)
    await records.release("k")
    assert (await records.begin("k", "fp", 30)).outcome == REPLAY


async def test_a_completed_record_expires_after_its_ttl(make_records: Records) -> None:
    records = await make_records()
    await records.begin("k", "fp", lock_ttl=30)
    await records.complete("k", StoredResponse(200, [], b"x"), ttl=0.3)
    assert (await records.begin("k", "fp", 30)).outcome == REPLAY
    assert await _until(records, NEW) >= 0.2


async def test_an_answer_after_the_lock_expired_is_not_kept(make_records: Records) -> None:
    records = await make_records()
    await records.begin("k", "fp", lock_ttl=0.05)
    await _until(records, NEW)
    await records.release("k")  # now no record at all
    await records.complete("k", StoredResponse(200, [], b"late"), ttl=60)
    assert (await records.begin("k", "fp", 30)).outcome == NEW


async def test_an_answer_too_big_to_keep_is_remembered_as_not_replayable(
    make_records: Records,
) -> None:
    records = await make_records()
    await records.begin("k", "fp", lock_ttl=30)
    await records.complete("k", StoredResponse(200, [], b"", replayable=False), ttl=60)
    again = await records.begin("k", "fp", 30)
    assert again.outcome == REPLAY
    assert again.response is not None
    assert not again.response.replayable


async def test_namespaces_do_not_share_keys(make_records: Records) -> None:
    a, b = await make_records("a"), await make_records("b")
    assert (await a.begin("k", "fp", 30)).outcome == NEW
    assert (await b.begin("k", "fp", 30)).outcome == NEW
    await a.complete("k", StoredResponse(200, [], b"a"), ttl=60)
    assert (await b.begin("k", "fp", 30)).outcome == IN_USE


# -- what only the shared store shows ------------------------------------------------------


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    store = RedisStore("shared", redis_server.url, prefix="t:", timeout=0.3)
    yield store
    await store.aclose()


def _records_of(store: RedisStore, namespace: str) -> IdempotencyRecords:
    return store.idempotency(namespace=namespace, max_keys=10, max_bytes=1000, meter=RecordsMeter())


async def test_namespaces_are_apart_in_redis_and_every_record_has_a_ttl(
    redis_store: RedisStore, redis_server: RedisServer
) -> None:
    namespace = uuid.uuid4().hex
    a, b = _records_of(redis_store, namespace + "a"), _records_of(redis_store, namespace + "b")
    assert (await a.begin("k", "fp", 30)).outcome == NEW
    assert (await b.begin("k", "fp", 30)).outcome == NEW
    await a.complete("k", StoredResponse(200, [], b"x"), ttl=3600)
    await b.mark_unknown("k", "fp", ttl=600)
    for name, most in ((f"t:idem:{namespace}a:k", 3600_000), (f"t:idem:{namespace}b:k", 600_000)):
        ttl = int(redis_server.command("PTTL", name))
        assert 0 < ttl <= most, (name, ttl)


async def test_a_record_outlives_the_gateway_that_wrote_it(
    redis_server: RedisServer,
) -> None:
    namespace = uuid.uuid4().hex
    first = RedisStore("shared", redis_server.url, timeout=1.0)
    records = _records_of(first, namespace)
    await records.begin("k", "fp", 30)
    await records.complete("k", StoredResponse(202, [(b"X-Id", b"7")], b"queued"), ttl=60)
    await first.aclose()  # the gateway restarts: a new client, nothing kept in memory
    second = RedisStore("shared", redis_server.url, timeout=1.0)
    try:
        replay = await _records_of(second, namespace).begin("k", "fp", 30)
        assert replay.outcome == REPLAY
        assert replay.response is not None
        assert (replay.response.status, replay.response.headers, replay.response.body) == (
            202,
            [(b"X-Id", b"7")],
            b"queued",
        )
    finally:
        await second.aclose()


async def _store_error_within(operation: Awaitable[object], bound: float) -> float:
    started = time.monotonic()
    with pytest.raises(StoreError) as raised:
        await operation
    elapsed = time.monotonic() - started
    assert elapsed < bound, elapsed
    assert "shared" in str(raised.value)
    return elapsed


async def test_redis_paused_stopped_and_back(tmp_path: Path) -> None:
    """Paused: no answer, StoreError within the store's timeout.  Stopped: refused at once.
    Restarted on the same port: the same store answers again, with no restart of its own."""
    server = RedisServer(tmp_path).start()
    store = RedisStore("shared", server.url, timeout=0.3)
    records = _records_of(store, "n")
    try:
        assert (await records.begin("before", "fp", 30)).outcome == NEW
        server.pause()
        try:
            await _store_error_within(records.begin("k", "fp", 30), bound=1.0)
        finally:
            server.resume()
        server.stop()
        await _store_error_within(records.begin("k", "fp", 30), bound=1.0)
        server.start()  # same port, empty (nothing persisted)
        # the store tries again once its back-off after the failures has passed
        deadline = time.monotonic() + 5
        while True:
            try:
                first = await records.begin("k", "fp", 30)
                break
            except StoreError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        assert first.outcome == NEW
        assert (await records.begin("k", "fp", 30)).outcome == IN_USE
    finally:
        await store.aclose()
        server.stop()


def test_header_encoding_round_trips_any_bytes() -> None:
    headers = [(b"A", b""), (b"B", b"1:2:3"), (b"", b"\x00\xff"), (b"C" * 300, b"d" * 70000)]
    assert decode_headers(encode_headers(headers)) == headers
    assert decode_headers(b"") == []
    with pytest.raises(ValueError, match="odd"):
        decode_headers(b"1:a")
    with pytest.raises(ValueError, match="truncated"):
        decode_headers(b"1:a5:bc")


async def test_a_begin_that_got_no_answer_leaves_no_lock_behind(tmp_path: Path) -> None:
    """Redis paused: `begin` fails at the store's timeout, but Redis runs the script when it
    resumes.  The lock it takes is given up in the background, so the client's retry is not
    told 409 for the lock's 30 s: it runs."""
    server = RedisServer(tmp_path).start()
    store = RedisStore("shared", server.url, timeout=0.2)
    records = _records_of(store, "n")
    try:
        # a connection already open: the script is sent, and Redis reads it once resumed
        assert (await records.begin("warm", "fp", lock_ttl=30)).outcome == NEW
        server.pause()
        try:
            await _store_error_within(records.begin("k", "fp", lock_ttl=30), bound=1.0)
        finally:
            server.resume()
        assert await _until(records, NEW, within=5.0) < 5.0
    finally:
        await store.aclose()
        server.stop()


async def test_giving_up_a_lock_touches_only_its_own(redis_store: RedisStore) -> None:
    records = _records_of(redis_store, uuid.uuid4().hex)
    assert isinstance(records, RedisIdempotencyRecords)
    name = records.key_name("k")
    # someone else's lock stays
    assert (await records.begin("k", "fp", 30)).outcome == NEW
    await redis_store.abandon(name, "not-its-owner", 30)
    assert (await records.begin("k", "fp", 30)).outcome == IN_USE
    # no record yet: a tombstone that this owner's late begin removes instead of locking …
    other = records.key_name("late")
    await redis_store.abandon(other, "owner-1", 30)
    late = await redis_store.run(records.begin_script(other, "fp", 30, "owner-1"))
    assert late == [b"abandoned"]
    assert (await records.begin("late", "fp", 30)).outcome == NEW
    # … and that anyone else's begin takes no notice of
    third = records.key_name("third")
    await redis_store.abandon(third, "owner-2", 30)
    assert (await records.begin("third", "fp", 30)).outcome == NEW
    assert (await records.begin("third", "fp", 30)).outcome == IN_USE


async def test_a_store_error_names_redis_without_the_password(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # not started: connections are refused
    store = RedisStore("shared", f"redis://:hunter2@127.0.0.1:{server.port}/0", timeout=0.3)
    try:
        with pytest.raises(StoreError) as raised:
            await store.ping()
        message = str(raised.value)
        assert f"redis://***@127.0.0.1:{server.port}/0" in message
        assert "hunter2" not in message
    finally:
        await store.aclose()


async def test_a_script_whose_connection_broke_is_never_sent_again() -> None:
    """A fault a real Redis cannot make on demand: a server that answers the client's handshake,
    reads the first script and closes the connection.  The store fails the operation; it never
    sends the script again (a `begin` sent twice would find its own lock and answer 409)."""
    scripts = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal scripts
        try:
            while line := await reader.readline():
                if not line.startswith(b"*"):
                    continue
                parts = []
                for _ in range(int(line[1:])):
                    await reader.readline()  # $<length>
                    parts.append((await reader.readline()).strip())
                if parts[0].upper() in (b"EVALSHA", b"EVAL"):
                    scripts += 1
                    return  # closes the connection with the script unanswered
                writer.write(b"+OK\r\n")  # CLIENT SETINFO and the like
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore("shared", f"redis://127.0.0.1:{port}/0", timeout=2.0)
    try:
        await _store_error_within(_records_of(store, "n").begin("k", "fp", 30), bound=2.5)
        assert scripts == 1
    finally:
        await store.aclose()
        server.close()
        await server.wait_closed()


async def test_an_answer_redis_could_not_take_is_written_once_it_is_back(
    tmp_path: Path,
) -> None:
    """The upstream answered but Redis is gone: `complete` does not fail the request, and the
    answer is written in the background once Redis is back — recreating the record the restart
    lost — so a repeat is replayed, not run again.  The same for an unknown outcome; a release
    that Redis misses does not fail either (the lock expires with its ttl)."""
    server = RedisServer(tmp_path).start()
    store = RedisStore("shared", server.url, timeout=0.3)
    records = _records_of(store, "n")
    try:
        for key in ("answered", "unknown", "released"):
            assert (await records.begin(key, "fp", lock_ttl=30)).outcome == NEW
        server.stop()
        await records.complete("answered", StoredResponse(201, [(b"X-A", b"1")], b"made"), 60)
        await records.mark_unknown("unknown", "fp", ttl=60)
        await records.release("released")
        server.start()  # empty: the locks are gone with the restart
        deadline = time.monotonic() + 5
        while True:
            try:
                replay = await records.begin("answered", "fp", 30)
                if replay.outcome == REPLAY:
                    break
            except StoreError:
                pass  # backing off after the outage
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert replay.response is not None
        assert (replay.response.status, replay.response.body) == (201, b"made")
        assert (await records.begin("answered", "other", 30)).outcome == REUSED
        assert (await records.begin("unknown", "fp", 30)).outcome == UNKNOWN
    finally:
        await store.aclose()
        server.stop()
