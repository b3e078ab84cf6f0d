"""The `stores:` section: a redis store's settings, every mistake reported at its YAML path,
stages naming declared stores only, and a password that no error message repeats."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.model import StoreConfig, StoreTLSConfig
from gateway.config.stores import redacted_url
from gateway.errors import ConfigErrors
from tests.support.certs import TestCA, other_key
from tests.support.config import parse_config

BASE = """
listeners: [{name: http, bind: "127.0.0.1:8080"}]
upstreams:
  app: {endpoints: [{url: "http://127.0.0.1:9001"}]}
"""
ROUTE = "routes:\n  - {name: app, match: {path_prefix: /}, upstream: app}\n"


def errors_of(
    text: str, base_dir: Path | None = None, env: dict[str, str] | None = None
) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        parse_config(text, base_dir=base_dir, env=env or {})
    return [str(e) for e in info.value.errors]


def test_a_redis_store_with_defaults_and_with_every_setting(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    client = ca.issue("client", client=True, common="gateway")
    text = (
        BASE
        + ROUTE
        + "stores:\n"
        + '  shared: {type: redis, url: "redis://127.0.0.1:6379/0"}\n'
        + '  secure: {url: "rediss://:${REDIS_PASSWORD}@redis.internal:6380/2", prefix: "edge:",'
        + f' timeout: 250ms, pool_size: 8, tls: {{ca: "{ca.path}", cert: "{client.cert}",'
        + f' key: "{client.key}"}}}}\n'
        + '  local: {url: "unix:///run/redis/redis.sock"}\n'
    )
    config = parse_config(text, env={"REDIS_PASSWORD": "s3cret"})
    assert config.stores == (
        StoreConfig(name="shared", url="redis://127.0.0.1:6379/0"),
        StoreConfig(
            name="secure",
            url="rediss://:s3cret@redis.internal:6380/2",
            prefix="edge:",
            timeout=0.25,
            pool_size=8,
            tls=StoreTLSConfig(ca=str(ca.path), cert=str(client.cert), key=str(client.key)),
        ),
        StoreConfig(name="local", url="unix:///run/redis/redis.sock"),
    )
    assert StoreConfig(name="x", url="redis://h").timeout == 0.1
    assert parse_config(BASE + ROUTE + "stores: {}\n").stores == ()


@pytest.mark.parametrize(
    ("store", "path", "message"),
    [
        ("memory: {url: 'redis://h'}", "stores.memory", "built in"),
        ("'bad name': {url: 'redis://h'}", "stores.bad name", "letters, digits"),
        ("shared: {type: redis}", "stores.shared.url", "is required"),
        ("shared: {url: 'http://h:6379'}", "stores.shared.url", "redis://, rediss:// or unix://"),
        ("shared: {url: 'redis://:6379'}", "stores.shared.url", "needs a host"),
        ("shared: {url: 'redis://h:99999'}", "stores.shared.url", "not a valid"),
        ("shared: {url: 'redis://h/db'}", "stores.shared.url", "database number"),
        ("shared: {url: 'unix://'}", "stores.shared.url", "socket path"),
        ("shared: {url: 'redis://h', type: memcached}", "stores.shared.type", '"redis"'),
        ("shared: {url: 'redis://h', timeout: 0s}", "stores.shared.timeout", ""),
        ("shared: {url: 'redis://h', pool_size: 0}", "stores.shared.pool_size", ""),
        ("shared: {url: 'redis://h', prefix: 'a b'}", "stores.shared.prefix", "without spaces"),
        ("shared: {url: 'redis://h', tls: {}}", "stores.shared.tls", "rediss://"),
        ("shared: {url: 'rediss://h', tls: {cert: c.crt}}", "stores.shared.tls.key", "go together"),
        ("shared: {url: 'rediss://h', tls: {ca: nowhere.crt}}", "stores.shared.tls.ca", ""),
        ("shared: {url: 'redis://h', db: 1}", "stores.shared.db", "unknown key"),
        ("shared: {url: 'redis://h', sentinel: {}}", "stores.shared.sentinel", "not supported yet"),
        # a cluster
        ("shared: {cluster: true}", "stores.shared.nodes", "is required with cluster: true"),
        ("shared: {cluster: 'true', nodes: ['redis://a']}", "stores.shared.cluster", "true or"),
        ("shared: {nodes: ['redis://a']}", "stores.shared.nodes", "needs cluster: true"),
        (
            "shared: {url: 'redis://a', nodes: ['redis://b']}",
            "stores.shared.nodes",
            "cluster: true",
        ),
        (
            "shared: {cluster: true, url: 'redis://a', nodes: ['redis://b']}",
            "stores.shared.url",
            "with cluster: true, list the seed nodes in nodes:",
        ),
        ("shared: {cluster: true, nodes: []}", "stores.shared.nodes", "non-empty list"),
        ("shared: {cluster: true, nodes: 'redis://a'}", "stores.shared.nodes", "non-empty list"),
        ("shared: {cluster: true, nodes: [1]}", "stores.shared.nodes[0]", "must be a string"),
        (
            "shared: {cluster: true, nodes: ['redis://a', 'unix:///run/redis.sock']}",
            "stores.shared.nodes[1]",
            "no unix://",
        ),
        ("shared: {cluster: true, nodes: ['http://a']}", "stores.shared.nodes[0]", "rediss://"),
        ("shared: {cluster: true, nodes: ['redis://:6379']}", "stores.shared.nodes[0]", "host"),
        ("shared: {cluster: true, nodes: ['redis://a:0x']}", "stores.shared.nodes[0]", "valid"),
        ("shared: {cluster: true, nodes: ['redis://a/2']}", "stores.shared.nodes[0]", "database 0"),
        ("shared: {cluster: true, nodes: ['redis://a/x']}", "stores.shared.nodes[0]", "number"),
        ("shared: {cluster: true, nodes: ['redis://a?db=1']}", "stores.shared.nodes[0]", "query"),
        (
            "shared: {cluster: true, nodes: ['redis://a', 'rediss://b']}",
            "stores.shared.nodes[1]",
            "scheme of the first",
        ),
        (
            "shared: {cluster: true, nodes: ['redis://:pw@a', 'redis://b']}",
            "stores.shared.nodes[1]",
            "user and password",
        ),
        (
            "shared: {cluster: true, nodes: ['redis://a', 'redis://b'], tls: {}}",
            "stores.shared.tls",
            "rediss:// nodes",
        ),
        (
            "shared: {cluster: true, nodes: ['redis://a'], pool_size: 0}",
            "stores.shared.pool_size",
            "",
        ),
        (
            "shared: {cluster: true, nodes: ['redis://a'], sentinel: {}}",
            "stores.shared.sentinel",
            "not supported yet",
        ),
    ],
)
def test_every_mistake_is_reported_at_its_path(
    tmp_path: Path, store: str, path: str, message: str
) -> None:
    errors = errors_of(BASE + ROUTE + "stores:\n  " + store + "\n", base_dir=tmp_path)
    assert any(e.startswith(path + ":") and message in e for e in errors), errors


def test_a_redis_cluster_with_its_seed_nodes(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    client = ca.issue("client", client=True, common="gateway")
    text = (
        BASE
        + ROUTE
        + "stores:\n"
        + "  shared: {type: redis, cluster: true,"
        + ' nodes: ["redis://10.0.0.1:6379", "redis://10.0.0.2:6379/0", "redis://10.0.0.3"]}\n'
        + "  secure:\n"
        + "    cluster: true\n"
        + '    nodes: ["rediss://:${REDIS_PASSWORD}@redis-0.internal:6380",'
        + ' "rediss://:${REDIS_PASSWORD}@redis-1.internal:6380"]\n'
        + f'    tls: {{ca: "{ca.path}", cert: "{client.cert}", key: "{client.key}"}}\n'
        + '    prefix: "edge:"\n'
        + "    timeout: 250ms\n"
        + "    pool_size: 8\n"
        + "  single: {cluster: false, url: 'redis://127.0.0.1:6379'}\n"
    )
    config = parse_config(text, env={"REDIS_PASSWORD": "s3cret"})
    assert config.stores == (
        StoreConfig(
            name="shared",
            cluster=True,
            nodes=("redis://10.0.0.1:6379", "redis://10.0.0.2:6379/0", "redis://10.0.0.3"),
        ),
        StoreConfig(
            name="secure",
            cluster=True,
            nodes=(
                "rediss://:s3cret@redis-0.internal:6380",
                "rediss://:s3cret@redis-1.internal:6380",
            ),
            prefix="edge:",
            timeout=0.25,
            pool_size=8,
            tls=StoreTLSConfig(ca=str(ca.path), cert=str(client.cert), key=str(client.key)),
        ),
        StoreConfig(name="single", url="redis://127.0.0.1:6379"),
    )
    assert config.stores[0].url == ""  # a cluster has nodes, no url
    assert not StoreConfig(name="x", url="redis://h").cluster
    assert StoreConfig(name="x", url="redis://h").nodes == ()


def test_every_wrong_node_is_reported_and_none_repeats_its_password() -> None:
    nodes = [
        "redis://:hunter2@a:6379",
        "redis://:hunter2@:6379",  # no host
        "rediss://:hunter2@c:6379",  # another scheme
        "redis://:hunter3@d:6379",  # another password
        "unix://:hunter2@/run/redis.sock",
        "redis://:hunter2@f:99999",
    ]
    listed = ", ".join(f"'{n}'" for n in nodes)
    errors = errors_of(BASE + ROUTE + f"stores:\n  shared: {{cluster: true, nodes: [{listed}]}}\n")
    assert sorted(e.split(":")[0] for e in errors) == [
        f"stores.shared.nodes[{i}]" for i in range(1, 6)
    ], errors
    assert not any("hunter" in e for e in errors), errors


def test_a_stage_may_name_a_cluster_store() -> None:
    config = parse_config(
        BASE
        + "stores:\n  shared: {cluster: true, nodes: ['redis://127.0.0.1:7000']}\n"
        + "routes:\n  - name: app\n    match: {path_prefix: /}\n    upstream: app\n"
        + "    pipeline: [{idempotency: {store: shared}}]\n"
    )
    assert config.routes[0].pipeline[0].config.store == "shared"  # type: ignore[attr-defined]


def test_a_client_certificate_must_match_its_key(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    client = ca.issue("client", client=True)
    other_key(tmp_path / "other.key")
    errors = errors_of(
        BASE
        + ROUTE
        + f"stores:\n  shared: {{url: 'rediss://h', tls: {{cert: '{client.cert}',"
        + f" key: '{tmp_path / 'other.key'}'}}}}\n"
    )
    assert any(e.startswith("stores.shared.tls.cert:") for e in errors), errors


def test_no_error_about_a_url_repeats_its_password() -> None:
    for url in ("http://:hunter2@h:6379", "redis://:hunter2@:6379", "redis://:hunter2@h/x"):
        errors = errors_of(BASE + ROUTE + f"stores:\n  shared: {{url: '{url}'}}\n")
        assert errors
        assert not any("hunter2" in e for e in errors), errors


def test_stages_name_declared_stores_only() -> None:
    stores = "stores:\n  shared: {url: 'redis://127.0.0.1:6379'}\n"
    idempotent = (
        "routes:\n  - name: app\n    match: {path_prefix: /}\n    upstream: app\n"
        "    pipeline: [{idempotency: {store: STORE}}]\n"
    )
    config = parse_config(BASE + stores + idempotent.replace("STORE", "shared"))
    assert config.routes[0].pipeline[0].config.store == "shared"  # type: ignore[attr-defined]
    errors = errors_of(BASE + stores + idempotent.replace("STORE", "sahred"))
    assert any(
        e.startswith("routes[0].pipeline[0].idempotency.store:")
        and "unknown store 'sahred'; stores: memory, shared" in e
        for e in errors
    ), errors


def test_a_store_with_an_error_is_not_reported_again_by_the_stages_naming_it() -> None:
    errors = errors_of(
        BASE
        + "stores:\n  shared: {url: 'ftp://h'}\n"
        + "routes:\n  - name: app\n    match: {path_prefix: /}\n    upstream: app\n"
        + "    pipeline: [{idempotency: {store: shared}}]\n"
    )
    assert [e.split(":")[0] for e in errors] == ["stores.shared.url"], errors


def test_a_rate_limit_may_share_its_buckets_through_a_redis_store() -> None:
    config = parse_config(
        BASE
        + "stores:\n  shared: {url: 'redis://127.0.0.1:6379'}\n"
        + "routes:\n  - name: app\n    match: {path_prefix: /}\n    upstream: app\n"
        + "    pipeline: [{rate_limit: {rate: 10, store: shared}}]\n"
    )
    assert config.routes[0].pipeline[0].config.store == "shared"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
        ("rediss://user:pw@redis.internal/1", "rediss://***@redis.internal/1"),
        ("redis://user@[::1]:6379", "redis://***@[::1]:6379"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_a_url_is_shown_without_its_credentials(url: str, shown: str) -> None:
    assert redacted_url(url) == shown
