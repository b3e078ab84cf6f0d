"""A redis store over TLS (`rediss://` with `tls: {ca, cert, key}`) against a real TLS-only
redis-server that requires a client certificate: built from the config as the gateway builds it,
and refused — as a store error, at once — without the certificate or with another CA."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.stores.base import IN_USE, NEW, RecordsMeter, StoreError
from gateway.stores.redis import RedisStore
from tests.support.certs import TestCA
from tests.support.config import parse_config
from tests.support.redis_tls import TLSRedisServer


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TLSRedisServer]:
    server = TLSRedisServer(tmp_path / "redis-tls").start()
    try:
        yield server
    finally:
        server.stop()


def _store(text_tls: str, url: str) -> RedisStore:
    config = parse_config(
        'listeners: [{name: http, bind: "127.0.0.1:0"}]\n'
        f"stores:\n  shared: {{url: '{url}', timeout: 1s, tls: {text_tls}}}\n"
    )
    [store_config] = config.stores
    return RedisStore.from_config(store_config)


async def _begin_twice(store: RedisStore) -> list[str]:
    records = store.idempotency(namespace="n", max_keys=1, max_bytes=1, meter=RecordsMeter())
    return [(await records.begin("k", "fp", 30)).outcome for _ in range(2)]


async def test_a_store_with_the_ca_and_a_client_certificate_works(
    tls_redis: TLSRedisServer,
) -> None:
    store = _store(
        f"{{ca: '{tls_redis.ca}', cert: '{tls_redis.client_cert}', key: '{tls_redis.client_key}'}}",
        tls_redis.url,
    )
    try:
        assert await _begin_twice(store) == [NEW, IN_USE]
    finally:
        await store.aclose()


async def test_without_a_client_certificate_the_store_fails_fast(
    tls_redis: TLSRedisServer,
) -> None:
    store = _store(f"{{ca: '{tls_redis.ca}'}}", tls_redis.url)
    try:
        with pytest.raises(StoreError, match="shared"):
            await store.ping()
    finally:
        await store.aclose()


async def test_a_server_another_ca_signed_is_refused(
    tls_redis: TLSRedisServer, tmp_path: Path
) -> None:
    (tmp_path / "other").mkdir()
    other = TestCA(tmp_path / "other", "other-ca")
    store = _store(
        f"{{ca: '{other.path}', cert: '{tls_redis.client_cert}', key: '{tls_redis.client_key}'}}",
        tls_redis.url,
    )
    try:
        with pytest.raises(StoreError, match=r"(?i)certificate"):
            await store.ping()
    finally:
        await store.aclose()
