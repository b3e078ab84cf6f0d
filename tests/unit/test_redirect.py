"""The `redirect` stage and a listener's `redirect_https`: config errors with their YAML paths,
routes without an upstream, the Location builder's defences, and the stage's decisions."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config.model import StageSpec
from gateway.errors import BadRequest, ConfigErrors
from gateway.http.location import host_only, location_path, location_query, with_port
from gateway.http.messages import RequestHead, Response
from gateway.http.path import split_target
from gateway.observability.exposition import Registry
from gateway.observability.metrics import GatewayMetrics
from gateway.pipeline import RequestContext
from gateway.stages.kind import BuildContext
from gateway.stages.redirect import RedirectConfig, RedirectStage
from gateway.stores.memory import MemoryStore
from tests.support.config import MINIMAL, config_errors, parse_config
from tests.support.context import make_context, make_snapshot

BASE = MINIMAL


def errors_of(text: str) -> list[str]:
    return config_errors(BASE + text)


def redirect_route(stage: str) -> str:
    return f"""
routes:
  - name: r
    match: {{path_prefix: /old}}
    pipeline:
      - redirect: {stage}
"""


# -- config ---------------------------------------------------------------------------------------


def test_a_redirect_route_needs_no_upstream() -> None:
    config = parse_config(BASE + redirect_route("{host: example.com:8443, scheme: https}"), env={})
    [route] = config.routes
    assert route.upstreams == ()
    assert route.pipeline[0].config == RedirectConfig(
        scheme="https", host="example.com:8443", path="{path}", query="keep", status=308
    )


@pytest.mark.parametrize(
    ("stage", "error"),
    [
        ("{status: 300}", "redirect.status: must be 301, 302, 303, 307 or 308"),
        ("{status: 200}", "redirect.status: must be 301, 302, 303, 307 or 308"),
        ("{status: true}", "redirect.status: must be 301, 302, 303, 307 or 308"),
        ("{scheme: ftp, host: a.example}", "redirect.scheme: must be http or https"),
        ("{scheme: https}", "redirect.host: is required with scheme"),
        ("{host: 'evil.com/x'}", "redirect.host: must be a host name or IP address"),
        ("{host: 'a b'}", "redirect.host: must be a host name or IP address"),
        ("{host: 'a.example:'}", "redirect.host: must be a host name or IP address"),
        ("{host: '{host}.evil.com'}", "redirect.host: must be {host}, {host}:PORT or a fixed"),
        ("{host: '{host}:0'}", "redirect.host: must be {host}, {host}:PORT or a fixed"),
        ("{host: '{client}'}", "redirect.host: must be {host}, {host}:PORT or a fixed"),
        ("{path: new}", "redirect.path: must start with / or {path}"),
        ("{path: '//evil.com{path}'}", None),  # valid: the Location keeps one leading slash
        ("{path: '{host}/x'}", "redirect.path: must start with / or {path}"),
        ("{path: '/a{host}'}", "redirect.path: unknown placeholder {host}; path takes"),
        ("{path: '/a{query}'}", "redirect.path: {query} belongs after a '?'"),
        ("{path: '/a?{path}'}", "redirect.path: {path} belongs before the '?'"),
        ("{path: '/a?b?c'}", "redirect.path: may have one '?' and no '#'"),
        ("{path: '/a#top'}", "redirect.path: contains '#': percent-encode it"),
        ("{path: '/a b'}", "redirect.path: contains ' ': percent-encode it"),
        ("{path: '/a\\\\b'}", "redirect.path: contains '\\\\': percent-encode it"),
        ("{path: '/a%zz'}", "redirect.path: contains a '%' that starts no escape"),
        ("{path: '/a{'}", "redirect.path: a '{' or '}' that is no placeholder"),
        ("{path: '/a?{query}', query: drop}", "redirect.query: is drop, but path places {query}"),
        ("{query: all}", "redirect.query: must be keep or drop"),
    ],
)
def test_config_errors_name_their_path(stage: str, error: str | None) -> None:
    if error is None:
        parse_config(BASE + redirect_route(stage), env={})
        return
    found = errors_of(redirect_route(stage))
    assert any(e.startswith(f"routes[0].pipeline[0].{error}") for e in found), found


def test_a_route_with_a_redirect_takes_no_upstream() -> None:
    assert errors_of(
        """
routes:
  - name: r
    upstream: u
    pipeline: [{redirect: {}}]
"""
    ) == [
        "routes[0].upstream: is never used: the pipeline's redirect stage answers every request"
        " (remove upstream)"
    ]


def test_a_route_without_a_redirect_needs_an_upstream() -> None:
    assert errors_of("routes:\n  - {name: r, pipeline: [{headers: {}}]}\n") == [
        "routes[0].upstream: is required (unless the pipeline has a redirect)"
    ]


def test_a_redirect_middleware_with_an_error_is_not_reported_twice() -> None:
    assert errors_of(
        """
middlewares:
  to-www: {redirect: {status: 200}}
routes:
  - {name: r, pipeline: [to-www]}
"""
    ) == ["middlewares.to-www.redirect.status: must be 301, 302, 303, 307 or 308"]


def test_stages_after_a_redirect_never_run_and_are_refused() -> None:
    assert errors_of(
        """
middlewares:
  moved: {redirect: {host: www.example.com}}
routes:
  - name: r
    pipeline: [{rate_limit: {rate: 5}}, moved, {headers: {}}, {retry: {}}]
"""
    ) == [
        "routes[0].pipeline[2]: never runs: the redirect at routes[0].pipeline[1] answers every"
        " request",
        "routes[0].pipeline[3]: never runs: the redirect at routes[0].pipeline[1] answers every"
        " request",
    ]


@pytest.mark.parametrize(
    ("listener", "error"),
    [
        ("{port: 0}", "listeners[0].redirect_https.port: must be between 1 and 65535"),
        ("{port: 70000}", "listeners[0].redirect_https.port: must be between 1 and 65535"),
        ("{port: x}", "listeners[0].redirect_https.port: must be an integer"),
        ("{prot: 8443}", "listeners[0].redirect_https.prot: unknown key (did you mean 'port'?)"),
        ("8443", "listeners[0].redirect_https: must be a mapping"),
    ],
)
def test_redirect_https_errors_name_their_path(listener: str, error: str) -> None:
    text = f"""
listeners: [{{name: http, bind: "127.0.0.1:8080", redirect_https: {listener}}}]
routes: [{{name: r, upstream: internal:echo}}]
"""
    with pytest.raises(ConfigErrors) as info:
        parse_config(text, env={})
    assert [str(e) for e in info.value.errors] == [error]


def test_redirect_https_defaults_to_443_and_is_for_plain_listeners() -> None:
    config = parse_config(
        """
listeners: [{name: http, bind: "127.0.0.1:8080", redirect_https: {}},
            {name: other, bind: "127.0.0.1:8081"}]
routes: [{name: r, upstream: internal:echo}]
""",
        env={},
    )
    assert [x.redirect_https for x in config.listeners] == [443, None]


# -- the Location builder -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "location"),
    [
        ("/a/b", "/a/b"),
        ("//evil.example/x", "/evil.example/x"),  # never a network-path reference
        ("///evil.example", "/evil.example"),
        ("/\\evil.example", "/%5Cevil.example"),  # browsers read "\" as "/"
        ("\\\\evil.example", "/%5C%5Cevil.example"),
        ("/a\r\nSet-Cookie: x=1", "/a%0D%0ASet-Cookie:%20x=1"),
        ("/a#frag", "/a%23frag"),
        ("/a?b", "/a%3Fb"),
        ("/%2F%zz%4", "/%2F%25zz%254"),
        ('/"<x>"', "/%22%3Cx%3E%22"),
        ("/é", "/%C3%A9"),
        ("", "/"),
    ],
)
def test_location_paths_are_encoded_and_keep_one_leading_slash(path: str, location: str) -> None:
    assert location_path(path) == location


def test_location_queries_are_encoded() -> None:
    assert location_query("a=1&b=/x?y") == "a=1&b=/x?y"
    assert location_query("a=1#x\r\n%zz%41") == "a=1%23x%0D%0A%25zz%41"


def test_hosts_and_ports() -> None:
    assert host_only(b"example.com:8080") == "example.com"
    assert host_only(b"[::1]:8080") == "[::1]"
    assert host_only(b"[::1]") == "[::1]"
    assert with_port("example.com", 443, 443) == "example.com"
    assert with_port("example.com", 8443, 443) == "example.com:8443"
    assert with_port("[::1]", None, 443) == "[::1]"


# -- decisions -------------------------------------------------------------------------------------

CONFIG = BASE + "routes:\n  - {name: app, match: {path_prefix: /}, upstream: u}\n"


class Never:
    async def __call__(self, ctx: RequestContext) -> Response:
        raise AssertionError("a redirect never goes further")


def _stage(config: RedirectConfig) -> tuple[RedirectStage, GatewayMetrics]:
    metrics = GatewayMetrics(Registry())
    env = BuildContext(
        loop=asyncio.get_running_loop(), metrics=metrics, stores={}, memory=MemoryStore()
    )
    spec = StageSpec(kind="redirect", config=config, owner="route:app:0")
    return RedirectStage(config, spec, env), metrics


def _request(target: bytes, host: bytes | None = b"evil.com") -> RequestHead:
    head = RequestHead()
    head.method = "GET"
    head.target = target
    head.path, head.query, head.plain_target, head.path_flags = split_target(target)
    head.host = host
    return head


async def _location(config: RedirectConfig, target: bytes, host: bytes | None = b"evil.com") -> str:
    stage, metrics = _stage(config)
    ctx = make_context(_request(target, host), snapshot=make_snapshot(CONFIG))
    response = await stage(ctx, Never())
    assert response.status == config.status
    assert ctx.outcomes == {"redirect": "redirected"}
    assert metrics.stage_total.labels("app", "redirect", "redirected").value == 1
    [(name, value)] = response.headers
    assert name == b"Location"
    return value.decode("ascii")


@pytest.mark.parametrize(
    ("config", "target", "location"),
    [
        # no scheme, no host: relative, whatever Host the client sent
        (RedirectConfig(), b"/a/b?x=1", "/a/b?x=1"),
        (RedirectConfig(query="drop"), b"/a/b?x=1", "/a/b"),
        (RedirectConfig(path="/new{path}"), b"/a?x=1", "/new/a?x=1"),
        (RedirectConfig(path="/{path}"), b"//evil.com", "/evil.com"),
        (RedirectConfig(path="/static"), b"/a?q", "/static?q"),
        (RedirectConfig(path="/s?from=old&{query}"), b"/a?q=1", "/s?from=old&q=1"),
        (RedirectConfig(path="/s?from=old&{query}"), b"/a", "/s?from=old"),
        (RedirectConfig(path="/s?from=old"), b"/a?q=1", "/s?from=old&q=1"),
        (RedirectConfig(path="/s?from=old", query="drop"), b"/a?q=1", "/s?from=old"),
        (RedirectConfig(), b"/a?q=%0D%0A#x", "/a?q=%0D%0A%23x"),
        # a fixed host: absolute, on the request's scheme unless scheme says otherwise
        (RedirectConfig(host="www.example.com"), b"/a", "http://www.example.com/a"),
        (
            RedirectConfig(scheme="https", host="www.example.com:8443", status=301),
            b"/a?q",
            "https://www.example.com:8443/a?q",
        ),
        # {host}: the request's host name, its port replaced
        (RedirectConfig(scheme="https", host="{host}"), b"/a", "https://evil.com/a"),
        (RedirectConfig(scheme="https", host="{host}:443"), b"/a", "https://evil.com/a"),
        (RedirectConfig(scheme="https", host="{host}:8443"), b"/a", "https://evil.com:8443/a"),
    ],
)
async def test_locations(config: RedirectConfig, target: bytes, location: str) -> None:
    assert await _location(config, target) == location


async def test_a_host_from_the_request_keeps_its_brackets() -> None:
    config = RedirectConfig(scheme="https", host="{host}")
    assert await _location(config, b"/", host=b"[::1]:8080") == "https://[::1]/"


@pytest.mark.parametrize("host", [None, b""])
async def test_host_placeholder_without_a_host_is_a_bad_request(host: bytes | None) -> None:
    stage, metrics = _stage(RedirectConfig(scheme="https", host="{host}"))
    ctx = make_context(_request(b"/a", host), snapshot=make_snapshot(CONFIG))
    with pytest.raises(BadRequest, match="no Host"):
        await stage(ctx, Never())
    assert ctx.outcomes == {"redirect": "no_host"}
    assert metrics.stage_total.labels("app", "redirect", "no_host").value == 1


async def test_path_placeholder_is_what_the_upstream_would_have_received() -> None:
    snapshot = make_snapshot(
        BASE
        + """
routes:
  - name: app
    match: {path_prefix: /old}
    strip_prefix: /old
    pipeline: [{redirect: {path: "/new{path}"}}]
"""
    )
    stage, _ = _stage(RedirectConfig(path="/new{path}"))
    for target, location in ((b"/old/a/b?x", "/new/a/b?x"), (b"/old", "/new/")):
        ctx = make_context(_request(target), snapshot=snapshot)
        response = await stage(ctx, Never())
        assert response.headers == [(b"Location", location.encode())]
