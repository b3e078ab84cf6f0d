"""The `rewrite` stage: its config errors with their YAML paths, the replace template's checks,
what a rewritten path must be, the decisions with a fake `call_next`, and the upstream head it
leads to (Host per try for `host: endpoint`)."""

from __future__ import annotations

import asyncio
import re

import pytest

from gateway.config.model import EndpointConfig, StageSpec
from gateway.errors import ConfigError, RewriteInvalid
from gateway.http.forwarding import build_request_head, rewritten_target, with_host
from gateway.http.messages import RequestHead, Response
from gateway.http.path import PATH_SEMICOLON, split_target
from gateway.observability.exposition import Registry
from gateway.observability.metrics import GatewayMetrics
from gateway.pipeline import RequestContext
from gateway.stages.kind import BuildContext
from gateway.stages.rewrite import (
    PathRewrite,
    RewriteConfig,
    RewriteStage,
    compile_replace,
    rewritten_path,
)
from gateway.stores.memory import MemoryStore
from tests.support.config import MINIMAL, config_errors, parse_config
from tests.support.context import make_context, make_snapshot

BASE = MINIMAL


def errors_of(text: str) -> list[str]:
    return config_errors(BASE + text)


def route_with(stage: str, extra: str = "") -> str:
    return f"""
routes:
  - name: r
    upstream: u{extra}
    pipeline:
      - rewrite: {stage}
"""


# -- config ---------------------------------------------------------------------------------------


def test_a_full_rewrite_parses() -> None:
    config = parse_config(
        BASE + route_with("{host: API.Internal:8443, path: {regex: '^/a/(.*)$', replace: '/\\1'}}"),
        env={},
    )
    [spec] = config.routes[0].pipeline
    assert spec.config == RewriteConfig(
        host="api.internal:8443", path=PathRewrite(regex="^/a/(.*)$", replace="/\\1")
    )


@pytest.mark.parametrize(
    ("stage", "error"),
    [
        ("{}", "routes[0].pipeline[0].rewrite: rewrites nothing: give host"),
        ("{host: client}", "routes[0].pipeline[0].rewrite: rewrites nothing"),
        (
            "{host: 'a b'}",
            "routes[0].pipeline[0].rewrite.host: must be client, endpoint or a host name",
        ),
        ("{host: 'x.com/evil'}", "routes[0].pipeline[0].rewrite.host: must be client, endpoint"),
        ("{host: 'x.com:99999'}", "routes[0].pipeline[0].rewrite.host: must be client"),
        ("{host: 'x.com:'}", "routes[0].pipeline[0].rewrite.host: must be client"),
        ("{host: ''}", "routes[0].pipeline[0].rewrite.host: must be client"),
        ("{hots: endpoint}", "routes[0].pipeline[0].rewrite.hots: unknown key (did you mean"),
        (
            "{path: {regex: '(', replace: /}}",
            "routes[0].pipeline[0].rewrite.path.regex: invalid regular expression",
        ),
        (
            "{path: {regex: '', replace: /}}",
            "routes[0].pipeline[0].rewrite.path.regex: must not be empty",
        ),
        ("{path: {regex: '^/'}}", "routes[0].pipeline[0].rewrite.path.replace: is required"),
        (
            "{path: {regex: '^/(a)', replace: '/\\2'}}",
            "routes[0].pipeline[0].rewrite.path.replace: \\2: the regex has 1 group(s)",
        ),
        (
            "{path: {regex: '^/(?P<id>a)', replace: '/\\g<idx>'}}",
            "routes[0].pipeline[0].rewrite.path.replace: \\g<idx>: no such named group (named: id)",
        ),
        (
            "{path: {regex: '^/', replace: '/x?y=1'}}",
            "routes[0].pipeline[0].rewrite.path.replace: contains '?', which a path cannot",
        ),
        (
            "{path: {regex: '^/', replace: '/a%2fb'}}",
            "routes[0].pipeline[0].rewrite.path.replace: contains %2F, which paths never carry",
        ),
        (
            "{path: {regex: '^/', replace: '/a%zz'}}",
            "routes[0].pipeline[0].rewrite.path.replace: contains a '%' that starts no escape",
        ),
        (
            "{path: {regex: '^/', replace: '/a\\n'}}",
            "routes[0].pipeline[0].rewrite.path.replace: a '\\' starts a group reference",
        ),
        (
            "{path: {regex: '^/', replace: '/a b'}}",
            "routes[0].pipeline[0].rewrite.path.replace: contains ' ', which a path cannot",
        ),
    ],
)
def test_config_errors_name_their_path(stage: str, error: str) -> None:
    found = errors_of(route_with(stage))
    assert any(e.startswith(error) for e in found), found


def test_strip_prefix_and_a_path_rewrite_are_refused_together() -> None:
    found = errors_of(
        route_with("{path: {regex: '^/a', replace: /b}}", extra="\n    strip_prefix: /a")
    )
    assert found == [
        "routes[0].pipeline[0]: rewrites the path, and so does the route's strip_prefix"
        " (/a): use one (the regex can strip the prefix)"
    ]
    # a host rewrite goes with strip_prefix
    parse_config(BASE + route_with("{host: endpoint}", extra="\n    strip_prefix: /a"), env={})


def test_a_route_has_one_rewrite_stage() -> None:
    found = errors_of(
        """
middlewares:
  to-endpoint: {rewrite: {host: endpoint}}
routes:
  - name: r
    upstream: u
    pipeline: [to-endpoint, {rewrite: {host: fixed.example}}]
"""
    )
    assert found == [
        "routes[0].pipeline[1]: a route has one rewrite stage (there is one before this one)"
    ]


def test_replace_becomes_an_unambiguous_template() -> None:
    pattern = re.compile(r"^/(?P<svc>[^/]+)/(\d+)(.*)$")
    template = compile_replace(pattern, r"/v2/\g<svc>/\2\g<3>0")
    assert template == r"/v2/\g<1>/\g<2>\g<3>0"
    assert pattern.sub(template, "/users/42/x") == "/v2/users/42/x0"
    with pytest.raises(ConfigError):
        compile_replace(pattern, r"\g<4>")


# -- the rewritten path ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/users", "/v2/users"),
        ("//v2///users/", "/v2/users/"),  # repeated slashes merge, as for a client
        ("/%7Euser/%41", "/~user/A"),  # unreserved escapes decoded, as for a client
        ("/a%3bb", "/a%3Bb"),
    ],
)
def test_a_rewritten_path_is_normalized(path: str, expected: str) -> None:
    assert rewritten_path(path, 0) == expected
    # the result is what the gateway itself would route and forward
    assert split_target(expected.encode())[0] == expected


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/../admin", "dot segment"),
        ("/public/../admin", "dot segment"),
        ("/a/./b", "dot segment"),
        ("/a/%2e%2E/b", "dot segment"),
        ("/a/.%2e", "dot segment"),
        ("/a%2Fb", "%2F"),
        ("/a%2fb", "%2F"),
        ("/a%5Cb", "%5C"),
        ("/a%00b", "NUL"),
        ("/a\\b", "backslash"),
        ("/a%zz", "invalid percent-encoding"),
        ("v2/users", "does not start with '/'"),
        ("http://evil.example/x", "does not start with '/'"),
        ("", "does not start with '/'"),
        ("/a?b", "'?' or '#'"),
        ("/a#b", "'?' or '#'"),
        ("/a b", "space"),
        ("/a\r\nX-Injected: 1", "control character"),
        ("/é", "not ASCII"),
        ("/..;x/admin", "dot segment with ';'"),
    ],
)
def test_a_rewritten_path_the_gateway_would_refuse_is_invalid(path: str, reason: str) -> None:
    with pytest.raises(RewriteInvalid) as info:
        rewritten_path(path, 0)
    assert info.value.status == 500
    assert info.value.code == "rewrite_invalid"
    assert reason in info.value.detail


def test_a_rewritten_path_obeys_the_routes_http_rules() -> None:
    assert rewritten_path("/a;b", 0) == "/a;b"
    with pytest.raises(RewriteInvalid, match="';'"):
        rewritten_path("/a;b", PATH_SEMICOLON)


# -- decisions -------------------------------------------------------------------------------------

CONFIG = BASE + "routes:\n  - {name: app, match: {path_prefix: /}, upstream: u}\n"


class Recorder:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, ctx: RequestContext) -> Response:
        self.calls += 1
        return Response(200, [])


def _request(target: bytes) -> RequestHead:
    head = RequestHead()
    head.method = "GET"
    head.raw_method = b"GET"
    head.target = target
    head.path, head.query, head.plain_target, head.path_flags = split_target(target)
    head.host = b"client.example:8080"
    return head


def _stage(config: RewriteConfig) -> tuple[RewriteStage, GatewayMetrics]:
    metrics = GatewayMetrics(Registry())
    env = BuildContext(
        loop=asyncio.get_running_loop(), metrics=metrics, stores={}, memory=MemoryStore()
    )
    spec = StageSpec(kind="rewrite", config=config, owner="route:app:0")
    return RewriteStage(config, spec, env), metrics


def _count(metrics: GatewayMetrics, outcome: str) -> float:
    return float(metrics.stage_total.labels("app", "rewrite", outcome).value)


VERSIONED = RewriteConfig(path=PathRewrite(regex=r"^/api/(v\d+)/(.*)$", replace=r"/\2/\1"))


async def test_a_matching_path_is_rewritten_and_the_query_kept() -> None:
    stage, metrics = _stage(VERSIONED)
    ctx = make_context(_request(b"/api/v1/users/7?x=1&y=%2F"), snapshot=make_snapshot(CONFIG))
    after = Recorder()
    assert (await stage(ctx, after)).status == 200
    assert after.calls == 1
    assert ctx.rewrite is not None
    assert ctx.rewrite.path == "/users/7/v1"
    # the query joins the path when the proxy builds the head (after every stage)
    assert rewritten_target(ctx.head, ctx.rewrite.path) == b"/users/7/v1?x=1&y=%2F"
    assert ctx.rewrite.host is None
    assert not ctx.rewrite.endpoint_host
    assert ctx.head.path == "/api/v1/users/7"  # what was routed and authorized stays as it was
    assert ctx.outcomes == {"rewrite": "rewritten"}
    assert _count(metrics, "rewritten") == 1


async def test_an_unmatched_path_goes_on_as_routed() -> None:
    stage, metrics = _stage(VERSIONED)
    ctx = make_context(_request(b"/other"), snapshot=make_snapshot(CONFIG))
    assert (await stage(ctx, Recorder())).status == 200
    assert ctx.rewrite is None
    assert ctx.outcomes == {"rewrite": "unmatched"}
    assert _count(metrics, "unmatched") == 1


async def test_a_rewrite_that_climbs_above_the_root_is_refused_before_the_upstream() -> None:
    # the operator's rule lets a capture split a segment: "/x..y" captures "..", which would
    # make "/../admin"
    config = RewriteConfig(path=PathRewrite(regex=r"^/x(.*)y/(.*)$", replace=r"/\1/\2"))
    stage, metrics = _stage(config)
    ctx = make_context(_request(b"/x..y/admin"), snapshot=make_snapshot(CONFIG))
    after = Recorder()
    with pytest.raises(RewriteInvalid):
        await stage(ctx, after)
    assert after.calls == 0
    assert ctx.outcomes == {"rewrite": "invalid"}
    assert _count(metrics, "invalid") == 1


async def test_a_host_only_rewrite_shares_one_value() -> None:
    stage, metrics = _stage(RewriteConfig(host="users.internal:8080"))
    first = make_context(_request(b"/a"), snapshot=make_snapshot(CONFIG))
    second = make_context(_request(b"/b"), snapshot=first.snapshot)
    await stage(first, Recorder())
    await stage(second, Recorder())
    assert first.rewrite is second.rewrite
    assert first.rewrite is not None
    assert first.rewrite.host == b"users.internal:8080"
    assert first.rewrite.path is None
    assert _count(metrics, "rewritten") == 2


async def test_an_endpoint_host_is_left_to_the_proxy() -> None:
    stage, _ = _stage(RewriteConfig(host="endpoint", path=VERSIONED.path))
    ctx = make_context(_request(b"/api/v2/x"), snapshot=make_snapshot(CONFIG))
    await stage(ctx, Recorder())
    assert ctx.rewrite is not None
    assert ctx.rewrite.endpoint_host
    assert ctx.rewrite.host is None
    assert ctx.rewrite.path == "/x/v2"


@pytest.mark.parametrize(
    ("regex", "replace", "path"),
    [
        (r"^/api/(v\d+)/(.*)$", r"/\2/\1", "/api/v1/users/7"),
        (r"^/a(/x)?(/.*)$", r"/b\1\2", "/a/y"),  # a group that took no part is empty
        (r"/old/", r"/new/", "/old/a/old/b/"),  # every match
        (r"^/(?P<id>[0-9]+)$", r"/items/\g<id>/\g<0>", "/42"),
        (r"^/x$", r"/y", "/z"),  # no match
    ],
)
async def test_the_stage_expands_replace_as_re_sub_would(
    regex: str, replace: str, path: str
) -> None:
    pattern = re.compile(regex)
    stage, _ = _stage(RewriteConfig(path=PathRewrite(regex=regex, replace=replace)))
    ctx = make_context(_request(path.encode()), snapshot=make_snapshot(CONFIG))
    await stage(ctx, Recorder())
    expected = pattern.sub(compile_replace(pattern, replace), path)
    if expected == path and not pattern.search(path):
        assert ctx.rewrite is None
    else:
        assert ctx.rewrite is not None
        assert ctx.rewrite.path == rewritten_path(expected, 0)


# -- the upstream head ----------------------------------------------------------------------------


def _head(upstream_host: bytes | None) -> bytes:
    return build_request_head(
        _request(b"/a"),
        b"/b",
        client=b"192.0.2.1",
        trusted_peer=False,
        scheme=b"http",
        request_id=b"id",
        content_length=None,
        chunked=False,
        upstream_host=upstream_host,
    )


def test_a_fixed_host_replaces_host_and_x_forwarded_host_names_the_clients() -> None:
    lines = _head(b"users.internal").split(b"\r\n")
    assert lines[0] == b"GET /b HTTP/1.1"
    assert b"Host: users.internal" in lines
    assert b"X-Forwarded-Host: client.example:8080" in lines
    assert sum(line.lower().startswith(b"host:") for line in lines) == 1
    # without a rewrite: the client's
    assert b"Host: client.example:8080" in _head(None).split(b"\r\n")


def test_each_try_adds_its_endpoints_host_after_the_request_line() -> None:
    shared = _head(b"")
    assert not any(line.lower().startswith(b"host:") for line in shared.split(b"\r\n"))
    for authority in (b"10.0.0.1:9001", b"[::1]:9002"):
        lines = with_host(shared, authority).split(b"\r\n")
        assert lines[0] == b"GET /b HTTP/1.1"
        assert lines[1] == b"Host: " + authority
        assert [line for line in lines if line.lower().startswith(b"host:")] == [lines[1]]
        assert b"X-Forwarded-Host: client.example:8080" in lines


@pytest.mark.parametrize(
    ("url", "authority"),
    [
        ("http://127.0.0.1:9001", "127.0.0.1:9001"),
        ("http://Users.Internal", "users.internal"),
        ("https://users.internal:443", "users.internal:443"),
        ("http://[::1]:9001", "[::1]:9001"),
        ("http://[::1]", "[::1]"),
        ("http://user:secret@svc:81", "svc:81"),
    ],
)
def test_an_endpoints_host_is_spelled_as_in_its_url(url: str, authority: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    assert parts.hostname is not None
    endpoint = EndpointConfig(url=url, scheme="http", host=parts.hostname, port=parts.port or 80)
    assert endpoint.authority == authority
