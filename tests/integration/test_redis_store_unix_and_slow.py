"""A redis store over a unix socket, and a Redis that is slow rather than gone (`DEBUG SLEEP`
blocks it): the operation fails at the store's timeout, never later, and the store answers
again once Redis does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.core.waiter import Continued
from gateway.stores.base import IN_USE, NEW, RecordsMeter, StoreError
from gateway.stores.redis import RedisStore
from tests.support.redis_server import RedisServer


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    # DEBUG is refused unless enabled; "local" allows it from loopback and unix sockets
    server = RedisServer(
        tmp_path / "redis",
        "--unixsocket",
        str(tmp_path / "redis.sock"),
        "--unixsocketperm",
        "700",
        "--enable-debug-command",
        "local",
    ).start()
    try:
        yield server
    finally:
        server.stop()


async def _until_blocked(port: int, within: float = 5.0) -> None:
    """Until a PING gets no answer within 100 ms: Redis is busy with the DEBUG SLEEP."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            await asyncio.wait_for(reader.readline(), 0.1)
        except TimeoutError:
            return
        finally:
            writer.close()
    raise AssertionError("Redis never blocked")


async def test_a_store_over_a_unix_socket(redis: RedisServer, tmp_path: Path) -> None:
    store = RedisStore("shared", f"unix://{tmp_path / 'redis.sock'}?db=0", timeout=1.0)
    records = store.idempotency(namespace="n", max_keys=1, max_bytes=1, meter=RecordsMeter())
    try:
        assert (await records.begin("k", "fp", 30)).outcome == NEW
        assert (await records.begin("k", "fp", 30)).outcome == IN_USE
        assert redis.command("EXISTS", "gw:idem:n:k").strip() == "1"
    finally:
        await store.aclose()


async def test_a_slow_redis_fails_at_the_timeout_and_answers_again(redis: RedisServer) -> None:
    store = RedisStore("shared", redis.url, timeout=0.2)
    records = store.idempotency(namespace="n", max_keys=1, max_bytes=1, meter=RecordsMeter())
    try:
        await store.ping()  # a connection open, as on a gateway that has served requests
        # Redis blocked for a second by another client's DEBUG SLEEP
        reader, writer = await asyncio.open_connection("127.0.0.1", redis.port)
        try:
            writer.write(b"DEBUG SLEEP 1\r\n")
            await writer.drain()
            await _until_blocked(redis.port)
            started = time.monotonic()
            with pytest.raises(StoreError, match="no answer within 200 ms"):
                await records.begin("slow", "fp", 30)
            assert time.monotonic() - started < 0.5
            assert await asyncio.wait_for(reader.readline(), 5) == b"+OK\r\n"
        finally:
            writer.close()
            await writer.wait_closed()
        deadline = time.monotonic() + 5
        while True:  # after the back-off, the store answers again
            try:
                await store.ping()
                break
            except StoreError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert store.state == "up"
    finally:
        await store.aclose()


def _clients(redis: RedisServer) -> int:
    """Connections Redis has open, redis-cli's own excluded."""
    return int(redis.command("INFO", "clients").split("connected_clients:")[1].split()[0]) - 1


async def test_closing_waits_for_an_operation_in_flight_and_nothing_connects_after(
    redis: RedisServer,
) -> None:
    """A store closed (a reload retired it) while an operation is under way lets it finish,
    then closes every connection; an operation after that fails at once and opens none (one
    that did would keep the event loop from closing)."""
    store = RedisStore("shared", redis.url, timeout=1.0)
    records = store.idempotency(namespace="n", max_keys=1, max_bytes=1, meter=RecordsMeter())
    await store.ping()
    reader, writer = await asyncio.open_connection("127.0.0.1", redis.port)
    try:
        writer.write(b"DEBUG SLEEP 0.3\r\n")
        await writer.drain()
        await _until_blocked(redis.port)
        in_flight = asyncio.ensure_future(records.begin("late", "fp", 30))
        deadline = time.monotonic() + 5
        while store._in_flight == 0:  # until it is sent, waiting for Redis to wake
            assert time.monotonic() < deadline
            await asyncio.sleep(0)
        assert not in_flight.done()
        await store.aclose()
        assert in_flight.done()
        assert (await in_flight).outcome == NEW  # answered, not cut off by the close
        assert await asyncio.wait_for(reader.readline(), 5) == b"+OK\r\n"
    finally:
        writer.close()
        await writer.wait_closed()
    started = time.monotonic()
    with pytest.raises(StoreError, match="is closed"):
        await records.begin("after", "fp", 30)
    assert time.monotonic() - started < 0.05
    deadline = time.monotonic() + 5
    while _clients(redis) > 0:  # the server sees the store's connections end
        assert time.monotonic() < deadline, redis.command("CLIENT", "LIST")
        await asyncio.sleep(0.05)
    assert redis.command("EXISTS", "gw:idem:n:after").strip() == "0"


async def test_an_operation_whose_store_closes_while_it_is_handed_to_a_task_is_never_sent(
    redis: RedisServer,
) -> None:
    """A request's stages run in a driven coroutine, which `run` hands to a task (one turn of
    the loop) before it counts the operation in flight.  A reload that closes the store in
    that turn closes it with nothing counted: the operation must then fail as closed, not go
    out on a connection being closed (CI saw "Connection lost") or open a new one."""
    store = RedisStore("shared", redis.url, timeout=1.0)
    await store.ping()
    operation = store.run(store.client.set("gw:raced", "1"), "gw:raced")
    # driven as a request's coroutine is, from a callback (no task): it yields to be handed to
    # a task, before anything is counted or sent
    first_step = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(lambda: first_step.set_result(operation.send(None)))
    assert await first_step is None
    assert store._in_flight == 0
    await store.aclose()  # the turn in which the reload's close runs
    task = asyncio.get_running_loop().create_task(Continued(operation, None))  # type: ignore[arg-type]
    try:
        with pytest.raises(StoreError, match="is closed"):
            await task
        assert redis.command("EXISTS", "gw:raced").strip() == "0"
        deadline = time.monotonic() + 5
        while _clients(redis) > 0:  # nothing connected again
            assert time.monotonic() < deadline, redis.command("CLIENT", "LIST")
            await asyncio.sleep(0.05)
    finally:
        # should the operation have connected again, that connection would keep the event loop
        # from closing (the test run would hang instead of failing)
        await store.client.connection_pool.disconnect()
