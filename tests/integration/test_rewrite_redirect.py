"""Host and path rewrites and redirects over real sockets (issue 17, parts 1 and 2): what the
upstream receives (an upstream that echoes the Host and path it got), the Host of each try of a
`host: endpoint` rewrite, refused rewrites, redirect routes without an upstream and the classic
open-redirect and header-injection probes, a listener's `redirect_https`, and reloads."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.config_builder import gateway_yaml, listener, route, upstream_to
from tests.support.gateway import port_of, running_gateway, write_config
from tests.support.metrics import scrape, value
from tests.support.raw import RawResponse, close_writer, exchange, open_raw, read_response

LOG_EVERY_REQUEST = {"enabled": True, "sample_ratio": 1.0}


@dataclass
class Echo:
    """An upstream that answers with the Host and request-target it received (as JSON), or with
    `status` when it is set."""

    name: str
    status: int = 200
    #: (Host, request-target) of every request, in arrival order
    seen: list[tuple[str, str]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    #: how many Host header lines each request had
    host_lines: list[int] = field(default_factory=list)
    server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        host = request.headers.get("Host", "")
        self.seen.append((host, request.raw_path))
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        self.host_lines.append(sum(n.lower() == b"host" for n, _ in request.raw_headers))
        body = {"name": self.name, "host": host, "target": request.raw_path}
        return web.json_response(body, status=self.status)

    #: the port it listens on (kept after it closed, for assertions made afterwards)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def echoes(*names: str) -> AsyncIterator[list[Echo]]:
    started = [Echo(name) for name in names]
    try:
        for echo in started:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", echo.handle)
            echo.server = TestServer(app, host="127.0.0.1")
            await echo.server.start_server()
            assert echo.server.port is not None
            echo.port = echo.server.port
        yield started
    finally:
        for echo in started:
            if echo.server is not None:
                await echo.server.close()


def get(target: str, host: str = "public.example", extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode("latin-1")


def answer(response: RawResponse) -> dict[str, Any]:
    assert response.status == 200, (response.status, response.body)
    result: dict[str, Any] = json.loads(response.body)
    return result


def problem(response: RawResponse) -> dict[str, Any]:
    assert response.header("content-type") == "application/problem+json"
    result: dict[str, Any] = json.loads(response.body)
    assert result["request_id"] == response.header("x-request-id")
    return result


def config(
    upstreams: Mapping[str, Sequence[str]],
    routes: Sequence[Mapping[str, Any]],
    **sections: Any,
) -> str:
    return gateway_yaml(
        upstreams={
            name: upstream_to(*urls, timeouts={"connect": "1s", "response_header": "2s"})
            for name, urls in upstreams.items()
        },
        routes=routes,
        **sections,
    )


# -- rewrite: Host ---------------------------------------------------------------------------------


async def test_the_upstream_host_is_the_clients_the_endpoints_or_a_fixed_one(
    tmp_path: Path,
) -> None:
    async with echoes("app") as [app]:
        text = config(
            {"app": [app.url]},
            [
                route("client", "app", "/client"),
                route(
                    "explicit",
                    "app",
                    "/explicit",
                    pipeline=[
                        {
                            "rewrite": {
                                "host": "client",
                                "path": {"regex": "^/explicit", "replace": "/e"},
                            }
                        }
                    ],
                ),
                route("endpoint", "app", "/endpoint", pipeline=[{"rewrite": {"host": "endpoint"}}]),
                route(
                    "fixed",
                    "app",
                    "/fixed",
                    pipeline=[{"rewrite": {"host": "Users.Internal:8443"}}],
                ),
            ],
        )
        async with running_gateway(tmp_path, text) as gw:
            port = port_of(gw)
            for target, host in [
                ("/client/x", "public.example:8080"),
                ("/explicit/x", "public.example:8080"),
                ("/endpoint/x", app.authority),
                ("/fixed/x", "users.internal:8443"),
            ]:
                body = answer(await exchange(port, get(target, "Public.Example:8080")))
                assert body["host"] == host, target
                # the host the client asked for is still named, as without a rewrite
                assert app.headers[-1]["x-forwarded-host"] == "public.example:8080"
            assert app.seen[1][1] == "/e/x"


@pytest.mark.parametrize("traced", [False, True], ids=["untraced", "traced"])
async def test_each_try_names_its_own_endpoint(tmp_path: Path, traced: bool) -> None:
    """`host: endpoint` is known only once the balancer picked an endpoint: a retry that goes to
    the other endpoint must name that one, not the first try's."""
    sections: dict[str, Any] = {}
    if traced:
        sections["tracing"] = {"sample_ratio": 1.0, "exporter": "none"}
    async with echoes("failing", "healthy") as (failing, healthy):
        failing.status = 503
        retry = {"attempts": 2, "retry_on": [503], "backoff": {"base": "1ms", "max": "2ms"}}
        text = config(
            {"app": [failing.url, healthy.url]},
            [route("app", "app", pipeline=[{"rewrite": {"host": "endpoint"}}, {"retry": retry}])],
            **sections,
        )
        async with running_gateway(tmp_path, text) as gw:
            for i in range(4):
                body = answer(await exchange(port_of(gw), get(f"/r/{i}")))
                assert body == {"name": "healthy", "host": healthy.authority, "target": f"/r/{i}"}
    # round robin over two endpoints: some requests were tried on the failing one first, then
    # retried on the healthy one — each try with its own Host, exactly one Host line
    assert failing.seen
    assert {host for host, _ in failing.seen} == {failing.authority}
    assert {host for host, _ in healthy.seen} == {healthy.authority}
    assert len(healthy.seen) == 4
    assert set(failing.host_lines + healthy.host_lines) == {1}
    for headers in failing.headers + healthy.headers:
        assert headers["x-forwarded-host"] == "public.example"
        assert ("traceparent" in headers) is traced


async def test_a_host_rewrite_changes_live_on_reload(tmp_path: Path) -> None:
    async with echoes("app") as [app]:

        def text(host: str) -> str:
            return config(
                {"app": [app.url]}, [route("app", "app", pipeline=[{"rewrite": {"host": host}}])]
            )

        async with running_gateway(tmp_path, text("one.internal")) as gw:
            assert answer(await exchange(port_of(gw), get("/x")))["host"] == "one.internal"
            write_config(tmp_path, text("two.internal"))
            assert (await gw.reload())["ok"] is True
            assert answer(await exchange(port_of(gw), get("/x")))["host"] == "two.internal"


# -- rewrite: path ---------------------------------------------------------------------------------


VERSIONED = {"regex": r"^/api/(v\d+)/(.*)$", "replace": r"/\2/\1"}


async def test_a_path_rewrite_keeps_the_query_and_what_was_routed(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    async with echoes("app") as [app]:
        text = config(
            {"app": [app.url]},
            [route("api", "app", "/api", pipeline=[{"rewrite": {"path": VERSIONED}}])],
            access_log=LOG_EVERY_REQUEST,
        )
        async with running_gateway(tmp_path, text) as gw:
            port = port_of(gw)
            body = answer(await exchange(port, get("/api/v1/users/7?x=1&y=%2F&z")))
            assert body["target"] == "/users/7/v1?x=1&y=%2F&z"
            # spellings are normalized before routing, and the rewrite sees the normalized path
            body = answer(await exchange(port, get("/api/./v2//users/%7Eme")))
            assert body["target"] == "/users/~me/v2"
            # not matched: forwarded as routed
            assert answer(await exchange(port, get("/api/other")))["target"] == "/api/other"
            samples = await scrape(gw)
            gw.snapshot.access_log.flush()
    assert (
        value(samples, "gateway_stage_total", route="api", stage="rewrite", outcome="rewritten")
        == 2
    )
    assert (
        value(samples, "gateway_stage_total", route="api", stage="rewrite", outcome="unmatched")
        == 1
    )
    logged = [json.loads(x) for x in capfd.readouterr().out.splitlines() if x.startswith("{")]
    lines = [x for x in logged if x.get("type") == "access"]
    # the access log shows the path the client asked for (as routed) and the stage's decision
    assert [(x["path"], x["stages"]) for x in lines] == [
        ("/api/v1/users/7", {"rewrite": "rewritten"}),
        ("/api/v2/users/~me", {"rewrite": "rewritten"}),
        ("/api/other", {"rewrite": "unmatched"}),
    ]


@pytest.mark.parametrize(
    ("rule", "target", "reason"),
    [
        # a capture that splits a segment would climb: "/x..y/admin" -> "/../admin"
        ({"regex": r"^/x(.*)y/(.*)$", "replace": r"/\1/\2"}, "/x..y/admin", "dot segment"),
        # ... or stay inside the root but steer the path: "/public/../admin"
        ({"regex": r"^/x(.*)y/(.*)$", "replace": r"/public/\1/\2"}, "/x..y/admin", "dot segment"),
        # an encoded slash assembled from two captures of an allowed "%25"
        ({"regex": r"^/x/(%)25(2F)(.*)$", "replace": r"/a\1\2\3"}, "/x/%252Fetc", "%2F"),
        ({"regex": r"^/x/(%)25(5C)(.*)$", "replace": r"/a\1\2\3"}, "/x/%255Cetc", "%5C"),
        ({"regex": r"^/x/(%)25(00)(.*)$", "replace": r"/a\1\2\3"}, "/x/%2500etc", "NUL"),
        # no longer an origin-form path
        ({"regex": r"^/x/(.*)$", "replace": r"\1"}, "/x/evil.example/a", "does not start"),
    ],
)
async def test_a_rewrite_the_gateway_would_refuse_from_a_client_is_a_500(
    tmp_path: Path, rule: dict[str, str], target: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with echoes("app") as [app]:
        text = config(
            {"app": [app.url]},
            [
                route(
                    "x",
                    "app",
                    pipeline=[{"rewrite": {"path": rule}}],
                    http={"path_escapes": ["percent"]},
                )
            ],
        )
        async with running_gateway(tmp_path, text) as gw:
            response = await exchange(port_of(gw), get(target))
            samples = await scrape(gw)
    assert response.status == 500
    found = problem(response)
    assert found["code"] == "rewrite_invalid"
    assert reason in found["detail"]
    assert app.seen == []  # never reached the upstream
    assert value(samples, "gateway_stage_total", route="x", stage="rewrite", outcome="invalid") == 1
    [record] = [r for r in caplog.records if r.name == "gateway.rewrite"]
    assert reason in record.getMessage()


@pytest.mark.parametrize("rewrite_first", [True, False], ids=["rewrite-first", "api-key-first"])
async def test_a_query_key_cut_by_a_later_stage_stays_cut(
    tmp_path: Path, rewrite_first: bool
) -> None:
    """The rewritten path takes the query as it is when the upstream head is built: an api_key
    stage after the rewrite still keeps its key from the upstream."""
    key = "s3cret-key"
    api_key = {
        "api_key": {"query": "key", "keys": {"svc": hashlib.sha256(key.encode()).hexdigest()}}
    }
    rewrite = {"rewrite": {"path": VERSIONED}}
    pipeline = [rewrite, api_key] if rewrite_first else [api_key, rewrite]
    async with echoes("app") as [app]:
        text = config({"app": [app.url]}, [route("api", "app", "/api", pipeline=pipeline)])
        async with running_gateway(tmp_path, text) as gw:
            body = answer(await exchange(port_of(gw), get(f"/api/v1/x?a=1&key={key}&b=2")))
    assert body["target"] == "/x/v1?a=1&b=2"
    assert app.headers[-1]["x-consumer"] == "svc"


async def test_the_echo_upstream_shows_the_rewritten_request(tmp_path: Path) -> None:
    text = config(
        {},
        [
            route(
                "echo",
                "internal:echo",
                "/api",
                pipeline=[{"rewrite": {"host": "svc.internal", "path": VERSIONED}}],
            )
        ],
    )
    async with running_gateway(tmp_path, text) as gw:
        response = await exchange(port_of(gw), get("/api/v3/a?q=1"))
    shown = answer(response)
    assert shown["path"] == "/a/v3"
    assert shown["query"] == "q=1"
    assert shown["headers"]["host"] == "svc.internal"
    assert shown["headers"]["x-forwarded-host"] == "public.example"


# -- redirect --------------------------------------------------------------------------------------


def location(response: RawResponse, status: int = 308) -> str:
    assert response.status == status, (response.status, response.body)
    assert response.body == b""
    assert response.header("content-length") == "0"
    found = response.header("location")
    assert found is not None
    # exactly one Location, and no header line smuggled in after it
    assert [n.lower() for n, _ in response.headers].count("location") == 1
    return found


def redirect_route(
    name: str, prefix: str, stage: Mapping[str, Any], **options: Any
) -> dict[str, Any]:
    """A route whose pipeline is one redirect: no upstream."""
    return {
        "name": name,
        "match": {"path_prefix": prefix},
        "pipeline": [{"redirect": dict(stage)}],
        **options,
    }


REDIRECTS = gateway_yaml(
    routes=[
        redirect_route("relative", "/rel", {}),
        redirect_route(
            "moved",
            "/old",
            {"status": 301, "scheme": "https", "host": "www.example.com", "path": "/new{path}"},
            strip_prefix="/old",
        ),
        redirect_route("slashes", "/s", {"path": "/{path}"}),
        redirect_route(
            "same-host", "/same", {"scheme": "https", "host": "{host}:8443", "query": "drop"}
        ),
    ]
)


async def test_redirect_routes_answer_without_an_upstream(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, REDIRECTS) as gw:
        port = port_of(gw)
        assert location(await exchange(port, get("/rel/a?x=1"))) == "/rel/a?x=1"
        moved = await exchange(port, get("/old/a/b?x=1"))
        assert location(moved, 301) == "https://www.example.com/new/a/b?x=1"
        assert moved.header("x-request-id")
        reader, writer = await open_raw(port)
        writer.write(b"HEAD /old/h HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await asyncio.wait_for(read_response(reader, head_request=True), 5)
        await close_writer(writer)
        assert head.status == 301
        assert head.header("location") == "https://www.example.com/new/h"
        post = await exchange(
            port, b"POST /rel/p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        )
        assert location(post) == "/rel/p"
        assert (
            location(await exchange(port, get("/same/x?q=1", "api.example.com:8080")))
            == "https://api.example.com:8443/same/x"
        )
        samples = await scrape(gw)
    for name, count in [("relative", 2), ("moved", 2), ("same-host", 1)]:
        assert (
            value(
                samples, "gateway_stage_total", route=name, stage="redirect", outcome="redirected"
            )
            == count
        )
        assert (
            value(
                samples,
                "gateway_requests_total",
                route=name,
                method="GET",
                code="308" if name != "moved" else "301",
            )
            >= 1
        )


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        # the Host is never where a relative or fixed redirect goes
        (get("/rel/x", "evil.com"), "/rel/x"),
        (get("/old/x", "evil.com"), "https://www.example.com/new/x"),
        # an absolute-form target names another host: ignored, as for routing
        (b"GET http://evil.com/rel/x HTTP/1.1\r\nHost: good.example\r\n\r\n", "/rel/x"),
        (
            b"GET https://evil.com/old/x HTTP/1.1\r\nHost: good.example\r\n\r\n",
            "https://www.example.com/new/x",
        ),
        # "//evil.com" is normalized before routing, and a Location has one leading slash
        (get("//rel//evil.com"), "/rel/evil.com"),
        (get("/s//evil.com/x"), "/s/evil.com/x"),
        # CR LF percent-encoded in the path or query stays encoded: no header is injected
        (get("/rel/a%0D%0ASet-Cookie:%20x=1"), "/rel/a%0D%0ASet-Cookie:%20x=1"),
        (
            get("/rel/a?q=%0D%0ALocation:%20http://evil.com"),
            "/rel/a?q=%0D%0ALocation:%20http://evil.com",
        ),
        # characters a Location cannot hold as they are get encoded
        (get('/rel/a"<b>'), "/rel/a%22%3Cb%3E"),
        (get("/rel/a?x=<y>&z=`"), "/rel/a?x=%3Cy%3E&z=%60"),
    ],
    ids=[
        "host-relative",
        "host-fixed",
        "absolute-form-relative",
        "absolute-form-fixed",
        "double-slash",
        "template-slash",
        "crlf-path",
        "crlf-query",
        "quotes-path",
        "quotes-query",
    ],
)
async def test_no_open_redirect_and_no_header_injection(
    tmp_path: Path, request_bytes: bytes, expected: str
) -> None:
    async with running_gateway(tmp_path, REDIRECTS) as gw:
        response = await exchange(port_of(gw), request_bytes)
    status = 301 if expected.startswith("https://www.") else 308
    assert location(response, status) == expected


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /rel/\\evil.com HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /rel/%5Cevil.com HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /rel/%2F%2Fevil.com HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /rel/a\rb HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /same/x HTTP/1.1\r\nHost: evil.com/x\r\n\r\n",
        b"GET /same/x HTTP/1.1\r\nHost: evil.com\r\nHost: good.example\r\n\r\n",
        b"GET /same/x HTTP/1.0\r\n\r\n",
        b"GET /same/x HTTP/1.1\r\nHost:\r\n\r\n",
    ],
    ids=[
        "backslash",
        "encoded-backslash",
        "encoded-slashes",
        "bare-cr",
        "host-path",
        "two-hosts",
        "http10-no-host",
        "empty-host",
    ],
)
async def test_what_cannot_be_redirected_safely_is_a_400(
    tmp_path: Path, request_bytes: bytes
) -> None:
    async with running_gateway(tmp_path, REDIRECTS) as gw:
        response = await exchange(port_of(gw), request_bytes)
    assert response.status == 400
    assert response.header("location") is None
    assert problem(response)["code"] == "bad_request"


# -- a listener's redirect_https -------------------------------------------------------------------


def _https_config(echo: Echo, redirect: Mapping[str, Any] | None = None) -> str:
    options: dict[str, Any] = {} if redirect is None else {"redirect_https": dict(redirect)}
    return config(
        {"app": [echo.url]},
        [route("app", "app")],
        listeners=[listener(name="http", **options), listener(name="other")],
        access_log=LOG_EVERY_REQUEST,
    )


async def test_redirect_https_answers_every_plain_request_but_acme_challenges(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    async with (
        echoes("app") as [app],
        running_gateway(tmp_path, _https_config(app, {"port": 8443})) as gw,
    ):
        port = port_of(gw)
        cases = [
            (get("/a/b?x=1&y", "Example.COM:8080"), "https://example.com:8443/a/b?x=1&y"),
            (get("/", "example.com"), "https://example.com:8443/"),
            (get("/a", "[::1]:8080"), "https://[::1]:8443/a"),
            (get("/a", "127.0.0.1"), "https://127.0.0.1:8443/a"),
            (
                b"GET http://evil.com/a HTTP/1.1\r\nHost: good.example\r\n\r\n",
                "https://good.example:8443/a",
            ),
            (get("//evil.com/%2e%2e/x"), "https://public.example:8443/x"),
            (
                get("/.well-known/acme-challenge"),
                "https://public.example:8443/.well-known/acme-challenge",
            ),
            (
                b"POST /form HTTP/1.1\r\nHost: example.com\r\nContent-Length: 2\r\n\r\nab",
                "https://example.com:8443/form",
            ),
        ]
        for request_bytes, expected in cases:
            assert location(await exchange(port, request_bytes)) == expected
        # an ACME HTTP-01 challenge is routed as usual
        acme = answer(await exchange(port, get("/.well-known/acme-challenge/tok3n")))
        assert acme["target"] == "/.well-known/acme-challenge/tok3n"
        # the other listener routes everything
        assert answer(await exchange(port_of(gw, "other"), get("/a")))["target"] == "/a"
        # no Host, an invalid one: 400, never a redirect to garbage
        for bad in (b"GET /a HTTP/1.0\r\n\r\n", get("/a", "evil.com/x"), get("/a", "")):
            response = await exchange(port, bad)
            assert response.status == 400
            assert response.header("location") is None
        samples = await scrape(gw)
        gw.snapshot.access_log.flush()
    name = "redirect_https:http"
    assert value(
        samples, "gateway_stage_total", route=name, stage="redirect_https", outcome="redirected"
    ) == len(cases)
    assert (
        value(samples, "gateway_stage_total", route=name, stage="redirect_https", outcome="no_host")
        == 2
    )
    assert (
        value(samples, "gateway_requests_total", route=name, method="GET", code="308")
        == len(cases) - 1
    )
    lines = [json.loads(x) for x in capfd.readouterr().out.splitlines() if x.startswith("{")]
    access = [x for x in lines if x.get("type") == "access" and x.get("route") == name]
    assert {json.dumps(x["stages"]) for x in access} == {
        '{"redirect_https": "redirected"}',
        '{"redirect_https": "no_host"}',
    }
    assert app.seen == [
        ("public.example", "/.well-known/acme-challenge/tok3n"),
        ("public.example", "/a"),
    ]


async def test_redirect_https_leaves_out_port_443_and_turns_on_and_off_live(tmp_path: Path) -> None:
    async with echoes("app") as [app], running_gateway(tmp_path, _https_config(app, {})) as gw:
        port = port_of(gw)
        assert (
            location(await exchange(port, get("/x?q", "example.com:80")))
            == "https://example.com/x?q"
        )
        write_config(tmp_path, _https_config(app))
        assert (await gw.reload())["ok"] is True
        assert answer(await exchange(port, get("/x")))["target"] == "/x"
        write_config(tmp_path, _https_config(app, {"port": 9443}))
        assert (await gw.reload())["ok"] is True
        assert (
            location(await exchange(port, get("/x", "example.com"))) == "https://example.com:9443/x"
        )
