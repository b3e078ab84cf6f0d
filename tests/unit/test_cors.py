"""The `cors` stage: its config (normalized origins, errors at their YAML paths), the origin
matcher against the classic tricks, and its decisions with a fake `call_next`."""

from __future__ import annotations

import pytest

from gateway.errors import RateLimited
from gateway.http.messages import RequestHead, Response
from gateway.observability.exposition import Registry
from gateway.observability.metrics import GatewayMetrics
from gateway.pipeline import RequestContext, compose
from gateway.stages.cors import CorsConfig, CorsStage
from tests.support.config import MINIMAL, config_errors, parse_config
from tests.support.context import make_context

BASE = MINIMAL


def cors_config(yaml_value: str) -> CorsConfig:
    config = parse_config(
        BASE
        + f"routes:\n  - name: r\n    upstream: u\n    pipeline:\n      - cors: {yaml_value}\n",
        env={},
    )
    stage = config.routes[0].pipeline[0].config
    assert isinstance(stage, CorsConfig)
    return stage


def errors_of(pipeline: str) -> list[str]:
    return config_errors(BASE + "routes:\n  - name: r\n    upstream: u\n    pipeline:\n" + pipeline)


# -- config ------------------------------------------------------------------------------------


def test_defaults_and_normalized_origins() -> None:
    config = cors_config(
        '{allow_origins: ["https://App.Example.COM", "https://example.com:443",'
        ' "http://localhost:3000", "HTTPS://*.Example.com", "null", "https://app.example.com"],'
        " allow_methods: [get, put, delete]}"
    )
    assert config.allow_origins == (
        "https://app.example.com",
        "https://example.com",
        "http://localhost:3000",
        "https://*.example.com",
        "null",
    )
    assert config.allow_methods == ("GET", "PUT", "DELETE")
    assert config.allow_headers == ()
    assert config.expose_headers == ()
    assert config.allow_credentials is False
    assert config.max_age == 600.0


@pytest.mark.parametrize(
    ("value", "error"),
    [
        pytest.param(
            '{allow_origins: ["*"], allow_credentials: true}',
            "routes[0].pipeline[0].cors.allow_origins: * cannot be combined with"
            " allow_credentials: true",
            id="star-with-credentials",
        ),
        pytest.param(
            '{allow_origins: ["https://a.example"], allow_headers: ["*"], allow_credentials: true}',
            "routes[0].pipeline[0].cors.allow_headers: * cannot be combined with",
            id="star-headers-with-credentials",
        ),
        pytest.param(
            '{allow_origins: ["*", "https://a.example"]}',
            "routes[0].pipeline[0].cors.allow_origins: * allows every origin: list it alone",
            id="star-among-others",
        ),
        pytest.param(
            '{allow_origins: ["https://a.example/"]}',
            "routes[0].pipeline[0].cors.allow_origins[0]: 'https://a.example/': an origin has no"
            " path",
            id="trailing-slash",
        ),
        pytest.param(
            '{allow_origins: ["https://ok.example", "a.example"]}',
            "routes[0].pipeline[0].cors.allow_origins[1]: 'a.example' must be scheme://host",
            id="no-scheme",
        ),
        pytest.param(
            '{allow_origins: ["https://*.com"]}',
            "allow_origins[0]: 'https://*.com': a wildcard needs a domain of two labels",
            id="wildcard-over-a-tld",
        ),
        pytest.param(
            '{allow_origins: ["https://app*.example.com"]}',
            "allow_origins[0]: 'https://app*.example.com': a wildcard is only scheme://*.domain",
            id="wildcard-inside-a-label",
        ),
        pytest.param(
            '{allow_origins: ["https://*"]}',
            "allow_origins[0]: 'https://*': a wildcard is only",
            id="wildcard-alone",
        ),
        pytest.param(
            '{allow_origins: ["https://a.example:99999"]}',
            "allow_origins[0]: 'https://a.example:99999': the port must be 1 to 65535",
            id="port",
        ),
        pytest.param(
            '{allow_origins: ["https://bücher.example"]}',
            "xn-- form",
            id="idn",
        ),
        pytest.param(
            "{allow_origins: []}", "cors.allow_origins: must be a non-empty list", id="empty"
        ),
        pytest.param("{}", "routes[0].pipeline[0].cors.allow_origins: is required", id="missing"),
        pytest.param(
            '{allow_origins: ["https://a.example"], allow_methods: ["GET POST"]}',
            "cors.allow_methods[0]: must be a method",
            id="method",
        ),
        pytest.param(
            '{allow_origins: ["https://a.example"], max_age: 500ms}',
            "cors.max_age: is sent in whole seconds",
            id="max-age",
        ),
        pytest.param(
            '{allow_origins: ["https://a.example"], allow_origin: ["https://b.example"]}',
            "cors.allow_origin: unknown key (did you mean 'allow_origins'?)",
            id="typo",
        ),
    ],
)
def test_config_errors_name_their_yaml_path(value: str, error: str) -> None:
    errors = errors_of(f"      - cors: {value}\n")
    assert any(error in e for e in errors), errors


def test_cors_must_come_before_authentication() -> None:
    errors = errors_of(
        "      - jwt: {algorithms: [HS256], secret: 0123456789abcdef0123456789abcdef}\n"
        '      - cors: {allow_origins: ["https://a.example"]}\n'
    )
    assert errors == [
        "routes[0].pipeline[1]: cors must come before jwt: browsers send preflights without"
        " credentials, so jwt would refuse them all, and its 401s would reach scripts without"
        " CORS headers"
    ]


def test_one_cors_stage_a_route() -> None:
    errors = errors_of(
        '      - cors: {allow_origins: ["https://a.example"]}\n'
        '      - cors: {allow_origins: ["https://b.example"]}\n'
    )
    assert errors == ["routes[0].pipeline[1]: a route has one cors stage: merge the two"]


# -- the origin matcher ------------------------------------------------------------------------

MATCHER = CorsStage(
    cors_config(
        '{allow_origins: ["https://app.example.com", "https://*.example.com",'
        ' "http://*.dev.example.net:8080"]}'
    ),
    GatewayMetrics(Registry()).stage_total,
)


@pytest.mark.parametrize(
    ("origin", "answer"),
    [
        ("https://app.example.com", "https://app.example.com"),
        ("https://APP.Example.Com", "https://app.example.com"),  # lower-cased, never as sent
        ("https://a.example.com", "https://a.example.com"),
        ("https://a.b-c.example.com", "https://a.b-c.example.com"),  # several labels
        ("http://x.dev.example.net:8080", "http://x.dev.example.net:8080"),
        # the wildcard is for subdomains only: never the apex, another scheme or port
        ("https://example.com", None),
        ("http://a.example.com", None),
        ("https://a.example.com:8443", None),
        ("https://a.example.com:443", None),  # browsers never send the default port
        ("http://x.dev.example.net", None),
        ("http://x.dev.example.net:8081", None),
        # suffix and prefix tricks
        ("https://example.com.evil.com", None),
        ("https://app.example.com.evil.com", None),
        ("https://evilexample.com", None),
        ("https://evil.com?x=.example.com", None),
        ("https://evil.com/.example.com", None),
        ("https://evil.com#.example.com", None),
        ("https://evil.com\\.example.com", None),
        ("https://user@a.example.com", None),
        ("https://evil.com:1.example.com", None),
        ("https://.example.com", None),
        ("https://a..example.com", None),
        ("https://a.example.com.", None),
        ("https://a example.com", None),
        ("https://app.example.com/", None),
        ("https://app.example.com https://evil.com", None),
        ("null", None),  # only when listed
        ("", None),
    ],
)
def test_allowed_origins(origin: str, answer: str | None) -> None:
    expected = None if answer is None else answer.encode()
    assert MATCHER.allowed_origin(origin.encode("latin-1")) == expected


def test_null_only_when_listed_and_star_answers_star() -> None:
    metrics = GatewayMetrics(Registry()).stage_total
    listed = CorsStage(cors_config('{allow_origins: ["null"]}'), metrics)
    assert listed.allowed_origin(b"null") == b"null"
    assert listed.allowed_origin(b"https://null") is None
    anyone = CorsStage(cors_config('{allow_origins: ["*"]}'), metrics)
    # * is never a reflection: any Origin, even a forged one, gets *
    assert anyone.allowed_origin(b"https://evil.com") == b"*"
    assert anyone.allowed_origin(b"null") == b"*"


# -- decisions ---------------------------------------------------------------------------------


class Upstream:
    """A fake rest of the pipeline: counts its calls, answers with `headers`."""

    def __init__(self, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.calls = 0
        self.headers = headers or []

    async def __call__(self, ctx: RequestContext) -> Response:
        self.calls += 1
        return Response(200, list(self.headers), b"ok")


def request(method: str, *headers: tuple[str, str]) -> RequestContext:
    head = RequestHead()
    head.method = method
    head.headers = [(n.encode(), v.encode()) for n, v in headers]
    return make_context(head)


def stage(value: str) -> tuple[CorsStage, GatewayMetrics]:
    metrics = GatewayMetrics(Registry())
    return CorsStage(cors_config(value), metrics.stage_total), metrics


def names(response: Response) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for n, v in response.headers:
        found.setdefault(n.decode().lower(), []).append(v.decode())
    return found


def counted(metrics: GatewayMetrics) -> dict[str, float]:
    return {
        values[2]: child.value
        for values, child in metrics.stage_total.children.items()
        if values[1] == "cors" and child.value
    }


FULL = (
    '{allow_origins: ["https://app.example.com"], allow_methods: [GET, PUT, DELETE],'
    " allow_headers: [Authorization, Content-Type, X-Trace], expose_headers: [X-Total],"
    " allow_credentials: true, max_age: 1h}"
)


async def test_an_allowed_preflight_is_answered_here() -> None:
    cors, metrics = stage(FULL)
    upstream = Upstream()
    ctx = request(
        "OPTIONS",
        ("Origin", "https://app.example.com"),
        ("Access-Control-Request-Method", "PUT"),
        ("Access-Control-Request-Headers", "content-type, x-trace"),
        ("access-control-request-headers", "Authorization"),
    )
    response = await cors(ctx, upstream)
    assert upstream.calls == 0
    assert response.status == 204
    assert names(response) == {
        "access-control-allow-origin": ["https://app.example.com"],
        "access-control-allow-credentials": ["true"],
        "access-control-allow-methods": ["GET, PUT, DELETE"],
        "access-control-allow-headers": ["Authorization, Content-Type, X-Trace"],
        "access-control-max-age": ["3600"],
        "vary": ["Origin"],
    }
    assert ctx.outcomes == {"cors": "preflight"}
    assert counted(metrics) == {"preflight": 1}


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([("Origin", "https://evil.com")], id="origin"),
        pytest.param([("Origin", "https://app.example.com.evil.com")], id="suffix-trick"),
        pytest.param([("Origin", "null")], id="null"),
        pytest.param(
            [("Origin", "https://app.example.com"), ("Origin", "https://evil.com")],
            id="two-origins",
        ),
        pytest.param(
            [("Origin", "https://app.example.com"), ("Access-Control-Request-Method", "PATCH")],
            id="method",
        ),
        pytest.param(
            [("Origin", "https://app.example.com"), ("Access-Control-Request-Method", "put")],
            id="method-case",  # compared as browsers compare it: exactly
        ),
        pytest.param(
            [
                ("Origin", "https://app.example.com"),
                ("Access-Control-Request-Method", "GET"),
                ("Access-Control-Request-Method", "PUT"),
            ],
            id="two-methods",
        ),
        pytest.param(
            [
                ("Origin", "https://app.example.com"),
                ("Access-Control-Request-Headers", "content-type, x-secret"),
            ],
            id="header",
        ),
    ],
)
async def test_a_refused_preflight_gets_no_cors_header_and_no_upstream(
    headers: list[tuple[str, str]],
) -> None:
    cors, metrics = stage(FULL)
    if not any(n == "Access-Control-Request-Method" for n, _ in headers):
        headers = [*headers, ("Access-Control-Request-Method", "GET")]
    upstream = Upstream()
    ctx = request("OPTIONS", *headers)
    response = await cors(ctx, upstream)
    assert upstream.calls == 0
    assert response.status == 204
    assert names(response) == {"vary": ["Origin"]}
    assert ctx.outcomes == {"cors": "preflight_rejected"}
    assert counted(metrics) == {"preflight_rejected": 1}


async def test_safelisted_methods_and_star_headers_as_browsers_read_them() -> None:
    cors, _ = stage(
        '{allow_origins: ["https://a.example"], allow_methods: [PUT], allow_headers: ["*"]}'
    )

    async def preflight(method: str, requested: str) -> bool:
        ctx = request(
            "OPTIONS",
            ("Origin", "https://a.example"),
            ("Access-Control-Request-Method", method),
            ("Access-Control-Request-Headers", requested),
        )
        response = await cors(ctx, Upstream())
        return "access-control-allow-origin" in names(response)

    assert await preflight("POST", "x-anything, content-type")  # POST needs no listing
    assert await preflight("PUT", "x-anything")
    assert not await preflight("DELETE", "")
    # * covers every header but Authorization, which must be listed by name
    assert not await preflight("GET", "authorization")


async def test_an_options_request_without_request_method_goes_upstream() -> None:
    cors, metrics = stage(FULL)
    upstream = Upstream()
    ctx = request("OPTIONS", ("Origin", "https://app.example.com"))
    response = await cors(ctx, upstream)
    assert upstream.calls == 1
    assert names(response)["access-control-allow-origin"] == ["https://app.example.com"]
    assert counted(metrics) == {"allowed": 1}


async def test_an_allowed_request_gets_the_headers_replacing_the_upstreams() -> None:
    cors, metrics = stage(FULL)
    upstream = Upstream(
        [
            (b"Access-Control-Allow-Origin", b"*"),
            (b"access-control-allow-credentials", b"false"),
            (b"Access-Control-Expose-Headers", b"X-Secret"),
            (b"Vary", b"Accept-Encoding"),
            (b"Content-Type", b"text/plain"),
        ]
    )
    ctx = request("GET", ("Origin", "https://APP.example.com"))
    response = await cors(ctx, upstream)
    assert upstream.calls == 1
    assert names(response) == {
        "vary": ["Accept-Encoding, Origin"],
        "content-type": ["text/plain"],
        "access-control-allow-origin": ["https://app.example.com"],
        "access-control-allow-credentials": ["true"],
        "access-control-expose-headers": ["X-Total"],
    }
    assert ctx.outcomes == {"cors": "allowed"}
    assert counted(metrics) == {"allowed": 1}


@pytest.mark.parametrize(
    "origins",
    [
        pytest.param(["https://evil.com"], id="other"),
        pytest.param(["https://evilapp.example.com"], id="prefix-trick"),
        pytest.param(["null"], id="null"),
        pytest.param(["https://app.example.com", "https://evil.com"], id="two-origins"),
        pytest.param(["https://evil.com", "https://app.example.com"], id="two-origins-reversed"),
    ],
)
async def test_a_refused_origin_still_goes_upstream_and_gets_no_cors_header(
    origins: list[str],
) -> None:
    cors, metrics = stage(FULL)
    # an upstream that reflects whatever comes: the gateway must not let it through
    upstream = Upstream(
        [(b"Access-Control-Allow-Origin", origins[0].encode()), (b"Vary", b"origin")]
    )
    ctx = request("POST", *(("Origin", o) for o in origins))
    response = await cors(ctx, upstream)
    assert upstream.calls == 1
    assert response.status == 200
    assert names(response) == {"vary": ["origin"]}  # already there: not added twice
    assert ctx.outcomes == {"cors": "rejected"}
    assert counted(metrics) == {"rejected": 1}


async def test_a_request_without_origin_is_left_alone_but_varies() -> None:
    cors, metrics = stage(FULL)
    ctx = request("GET")
    response = await cors(ctx, Upstream([(b"Vary", b"*")]))
    assert names(response) == {"vary": ["*"]}  # * already covers Origin
    response = await cors(ctx, Upstream([(b"ETag", b'"1"')]))
    assert names(response) == {"etag": ['"1"'], "vary": ["Origin"]}
    assert ctx.outcomes is None
    assert counted(metrics) == {}


async def test_star_answers_every_response_without_vary() -> None:
    cors, metrics = stage('{allow_origins: ["*"], expose_headers: ["*"]}')
    for headers in ([], [("Origin", "https://evil.com")], [("Origin", "a"), ("Origin", "b")]):
        response = await cors(request("GET", *headers), Upstream([(b"Vary", b"Accept")]))
        assert names(response) == {
            "vary": ["Accept"],
            "access-control-allow-origin": ["*"],
            "access-control-expose-headers": ["*"],
        }
    preflight = await cors(
        request(
            "OPTIONS", ("Origin", "https://evil.com"), ("Access-Control-Request-Method", "GET")
        ),
        Upstream(),
    )
    assert names(preflight)["access-control-allow-origin"] == ["*"]
    assert "vary" not in names(preflight)
    assert counted(metrics) == {"allowed": 2, "preflight": 1}


async def test_a_later_refusal_carries_the_cors_headers() -> None:
    cors, _ = stage(FULL)

    async def limited(ctx: RequestContext) -> Response:
        raise RateLimited("slow down", headers=[("Retry-After", "1")])

    with pytest.raises(RateLimited) as info:
        await cors(request("GET", ("Origin", "https://app.example.com")), limited)
    assert info.value.headers == (
        ("Retry-After", "1"),
        ("Access-Control-Allow-Origin", "https://app.example.com"),
        ("Access-Control-Allow-Credentials", "true"),
        ("Access-Control-Expose-Headers", "X-Total"),
        ("Vary", "Origin"),
    )
    with pytest.raises(RateLimited) as info:
        await cors(request("GET", ("Origin", "https://evil.com")), limited)
    assert info.value.headers == (("Retry-After", "1"), ("Vary", "Origin"))


@pytest.mark.parametrize("spelling", ["Origin", "origin", "ORIGIN", "oRiGiN"])
async def test_origin_is_read_in_any_spelling_and_other_six_letter_names_are_not_it(
    spelling: str,
) -> None:
    cors, metrics = stage(FULL)
    upstream = Upstream([(b"Date", b"Thu, 03 Dec 2026 12:00:00 GMT"), (b"VARY", b"Accept")])
    ctx = request(
        "GET",
        ("Accept", "https://app.example.com"),
        (spelling, "https://app.example.com"),
        ("Pragma", "https://evil.com"),
    )
    response = await cors(ctx, upstream)
    assert names(response) == {
        "date": ["Thu, 03 Dec 2026 12:00:00 GMT"],
        "vary": ["Accept, Origin"],  # merged into the upstream's, however it spelled it
        "access-control-allow-origin": ["https://app.example.com"],
        "access-control-allow-credentials": ["true"],
        "access-control-expose-headers": ["X-Total"],
    }
    assert counted(metrics) == {"allowed": 1}


@pytest.mark.parametrize(
    ("origin", "answer"),
    [
        (b"https://app.example.com", b"https://app.example.com"),
        (b"https://APP.example.com", b"https://app.example.com"),
        (b"", None),  # an empty Origin is no origin, even beside a one-origin list
        (b"https://app.example.co", None),
        (b"https://app.example.com.evil.com", None),
        (b"null", None),
    ],
)
def test_a_one_origin_list_allows_that_origin_only(origin: bytes, answer: bytes | None) -> None:
    cors, _ = stage('{allow_origins: ["https://app.example.com"]}')
    assert cors.allowed_origin(origin) == answer
    if not origin:  # nor with two origins listed
        two, _ = stage('{allow_origins: ["https://a.example", "https://b.example"]}')
        assert two.allowed_origin(origin) is None
        assert two.allowed_origin(b"https://b.example") == b"https://b.example"


async def test_first_in_its_route_the_stage_leaves_its_edit_to_the_connection() -> None:
    """As the route's first stage (compose calls its `outermost`), the stage runs no coroutine
    of its own: the response comes back as the upstream gave it, with the edit the connection
    applies in `ctx.edit` — the same edit `__call__` would have made; a preflight is still
    answered here, with no edit left."""
    cors, _ = stage(FULL)
    upstream = Upstream([(b"Access-Control-Allow-Origin", b"*"), (b"ETag", b'"1"')])
    handler = compose([cors], upstream)
    ctx = request("GET", ("Origin", "https://app.example.com"))
    response = await handler(ctx)
    assert names(response) == {"access-control-allow-origin": ["*"], "etag": ['"1"']}
    assert ctx.edit is not None
    assert names(ctx.edit.edited(response)) == names(await cors(ctx, upstream))
    preflight = request(
        "OPTIONS", ("Origin", "https://app.example.com"), ("Access-Control-Request-Method", "PUT")
    )
    answer = await handler(preflight)
    assert answer.status == 204
    assert answer.headers[0] == (b"Access-Control-Allow-Origin", b"https://app.example.com")
    assert preflight.edit is None
    assert upstream.calls == 2
