"""The tests' config builder writes YAML the real loader reads into the values it was given."""

from __future__ import annotations

import yaml

from tests.support.config import parse_config
from tests.support.config_builder import gateway_yaml, listener, route, upstream_to


def test_the_preamble_defaults_and_one_route_to_one_upstream() -> None:
    text = gateway_yaml(
        upstreams={"app": upstream_to("http://127.0.0.1:9001", timeouts={"connect": "1s"})},
        routes=[route("app", "app")],
    )
    config = parse_config(text)
    [http] = config.listeners
    assert (http.name, http.host, http.port, http.tls) == ("http", "127.0.0.1", 0, None)
    assert (config.admin.host, config.admin.port) == ("127.0.0.1", 0)
    assert config.access_log.enabled is False
    [app] = config.upstreams
    assert [e.url for e in app.endpoints] == ["http://127.0.0.1:9001"]
    assert app.connect_timeout == 1.0
    [only] = config.routes
    assert only.match.path_prefix == "/"
    assert [(u.name, u.weight) for u in only.upstreams] == [("app", 1)]
    assert list(yaml.safe_load(text)) == ["listeners", "admin", "access_log", "upstreams", "routes"]


def test_sections_and_options_keep_their_values_and_order() -> None:
    text = gateway_yaml(
        listeners=[listener(8080), listener(8443, "other")],
        admin={"bind": "127.0.0.1:9000", "token": "${BUILDER_TEST_TOKEN:-s3cret}"},
        access_log={"enabled": True, "exclude_fields": ["bytes_in"]},
        shutdown={"drain_delay": "300ms"},
        trusted_proxies=["127.0.0.2/32"],
        limits={"max_body_bytes": "1MiB", "header_timeout": "250ms"},
        upstreams={
            "heavy": upstream_to({"url": "http://127.0.0.1:9001", "weight": 9}),
            "light": upstream_to("http://127.0.0.1:9002", "http://127.0.0.1:9003"),
        },
        middlewares={"tag": {"headers": {"response": {"set": {"X-Tag": "0", "X-On": "yes"}}}}},
        routes=[
            route("ro", "heavy", "/ro", methods=["GET"], timeout="5s", pipeline=["tag"]),
            route("split", [{"name": "heavy", "weight": 9}, {"name": "light", "weight": 1}]),
            route("exact", "internal:echo", match={"path": "/exact"}, websocket=True),
        ],
    )
    assert list(yaml.safe_load(text)) == [
        "listeners",
        "admin",
        "limits",
        "trusted_proxies",
        "shutdown",
        "access_log",
        "upstreams",
        "middlewares",
        "routes",
    ]
    config = parse_config(text, env={})
    assert [(x.name, x.port) for x in config.listeners] == [("http", 8080), ("other", 8443)]
    assert (config.admin.port, config.admin.token) == (9000, "s3cret")
    assert config.access_log.exclude_fields == ("bytes_in",)
    assert config.shutdown.drain_delay == 0.3
    assert config.trusted_proxies == ("127.0.0.2/32",)
    assert (config.limits.max_body_bytes, config.limits.header_timeout) == (1024 * 1024, 0.25)
    heavy, light = config.upstreams
    assert [(e.url, e.weight) for e in heavy.endpoints] == [("http://127.0.0.1:9001", 9)]
    assert [e.port for e in light.endpoints] == [9002, 9003]
    [tag] = config.middlewares
    assert tag.kind == "headers"
    # strings YAML would read as a number or a boolean stay strings
    assert yaml.safe_load(text)["middlewares"]["tag"]["headers"]["response"]["set"] == {
        "X-Tag": "0",
        "X-On": "yes",
    }
    ro, split, exact = config.routes
    assert (ro.match.path_prefix, ro.match.methods, ro.timeout) == ("/ro", ("GET",), 5.0)
    assert [s.owner for s in ro.pipeline] == ["middleware:tag"]
    assert [(u.name, u.weight) for u in split.upstreams] == [("heavy", 9), ("light", 1)]
    assert (exact.match.path, exact.match.path_prefix, exact.websocket) == ("/exact", None, True)


def test_an_empty_section_is_left_to_the_loaders_defaults() -> None:
    config = parse_config(
        gateway_yaml(admin={}, access_log={}, routes=[route("e", "internal:echo")])
    )
    assert (config.admin.host, config.admin.port) == ("127.0.0.1", 9901)
    assert config.access_log.enabled is True


def test_a_value_two_routes_share_is_written_out_for_each() -> None:
    pipeline = [{"rate_limit": {"rate": 1, "per": "1m"}}]
    text = gateway_yaml(
        routes=[
            route("a", "internal:echo", "/a", pipeline=pipeline),
            route("b", "internal:echo", "/b", pipeline=pipeline),
        ]
    )
    assert "&id" not in text  # no YAML anchor and alias
    a, b = parse_config(text).routes
    assert [s.kind for s in a.pipeline] == [s.kind for s in b.pipeline] == ["rate_limit"]
