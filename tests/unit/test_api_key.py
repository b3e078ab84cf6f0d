"""The `api_key` stage: its config (keys by digest from a file and from the config, errors with
their YAML paths and never the value), its rules about the rest of the pipeline, the `consumer`
identity it sets, and its decisions with a fake `call_next`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gateway.errors import BadRequest, ConfigErrors, Unauthenticated
from gateway.http.headers import received_name_class
from gateway.http.messages import RequestHead, Response
from gateway.identity import identity_part
from gateway.observability.exposition import Registry
from gateway.observability.metrics import GatewayMetrics
from gateway.pipeline import RequestContext
from gateway.stages import api_key
from gateway.stages.api_key import ApiKeyConfig, ApiKeyStage
from gateway.stages.outcomes import StageOutcomes
from tests.support.config import MINIMAL, config_errors, load_config, parse_config
from tests.support.context import make_context

KEY = "k-3f9a7c1e5b2d8f4a6c0e9b7d5f3a1c8e"
OTHER = "k-other-0000000000000000000000000"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


BASE = MINIMAL


def errors_of(text: str, tmp_path: Path | None = None) -> list[str]:
    if tmp_path is None:
        return config_errors(BASE + text)
    (tmp_path / "gateway.yaml").write_text(BASE + text)
    with pytest.raises(ConfigErrors) as info:
        load_config(tmp_path / "gateway.yaml", env={})
    return [str(e) for e in info.value.errors]


def route_with(pipeline: str) -> str:
    return f"routes:\n  - {{name: r, upstream: u, pipeline: {pipeline}}}\n"


# -- config -------------------------------------------------------------------------------------


def test_keys_from_the_file_and_the_config_are_digests(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text(
        f"# consumers\nbilling: {digest(KEY)}\nreporting: [{digest('a')}, {digest('b').upper()}]\n"
    )
    (tmp_path / "gateway.yaml").write_text(
        BASE
        + route_with(
            "[{api_key: {keys_file: keys.yaml, keys: {ci: '${CI_KEY_SHA256}'}, query: key}}]"
        )
    )
    config = load_config(tmp_path / "gateway.yaml", env={"CI_KEY_SHA256": digest("ci-key")})
    [spec] = config.routes[0].pipeline
    api = spec.config
    assert isinstance(api, ApiKeyConfig)
    assert dict(api.keys) == {
        hashlib.sha256(KEY.encode()).digest(): "billing",
        hashlib.sha256(b"a").digest(): "reporting",
        hashlib.sha256(b"b").digest(): "reporting",
        hashlib.sha256(b"ci-key").digest(): "ci",
    }
    assert api.query == "key"
    assert api.keys_file == str(tmp_path / "keys.yaml")
    # the file is part of the config's version, so watched and reloaded like the others
    assert str(tmp_path / "keys.yaml") in config.files
    # nothing derived from a key in the config's repr (log lines, error messages)
    assert digest(KEY) not in repr(config)
    assert "<4 digests>" in repr(api)


def test_an_empty_keys_file_refuses_everyone_but_loads(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text("# revoked\n")
    (tmp_path / "gateway.yaml").write_text(BASE + route_with("[{api_key: {keys_file: keys.yaml}}]"))
    [spec] = load_config(tmp_path / "gateway.yaml", env={}).routes[0].pipeline
    assert isinstance(spec.config, ApiKeyConfig)
    assert spec.config.keys == ()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (f"billing: {KEY}\n", "keys_file: billing: must be the key's sha256 as 64 hex digits"),
        ("billing: [abc]\n", "keys_file: billing[0]: must be the key's sha256"),
        (f"a: {digest(KEY)}\nb: {digest(KEY)}\n", "keys_file: b: has the same key as consumer 'a'"),
        (f"a: {digest(KEY)}\na: {digest('x')}\n", "keys_file: a: duplicate key"),
        (f"'a:b': {digest(KEY)}\n", "keys_file: a:b: a consumer name is 1-256 visible ASCII"),
        (f"- {digest(KEY)}\n", "keys_file: must be a mapping of consumer name to the sha256"),
        ("a: [b\n", "keys_file: invalid YAML at line 2"),
    ],
    ids=["plain-key", "short", "shared-digest", "duplicate", "bad-name", "list", "yaml"],
)
def test_keys_file_errors_name_the_path_never_the_value(
    tmp_path: Path, content: str, message: str
) -> None:
    (tmp_path / "keys.yaml").write_text(content)
    errors = errors_of(route_with("[{api_key: {keys_file: keys.yaml}}]"), tmp_path)
    prefix = "routes[0].pipeline[0].api_key."
    assert any(e.startswith(prefix) and message in e for e in errors), errors
    assert not any(KEY in e or digest(KEY) in e for e in errors)


@pytest.mark.parametrize(
    ("stage", "path", "message"),
    [
        ("{api_key: {}}", "api_key", "needs keys_file or keys"),
        ("{api_key: {keys: {a: not-a-digest}}}", "api_key.keys.a", "64 hex digits"),
        (
            f"{{api_key: {{keys: {{a: {digest(KEY)}}}, header: X-K, query: k}}}}",
            "api_key",
            "set header or query",
        ),
        (
            f"{{api_key: {{keys: {{a: {digest(KEY)}}}, header: Authorization}}}}",
            "api_key.header",
            "Authorization carries a scheme's credentials",
        ),
        (
            f"{{api_key: {{keys: {{a: {digest(KEY)}}}, header: X-Consumer}}}}",
            "api_key.header",
            "set by the gateway itself",
        ),
        (f"{{api_key: {{keys: {{a: {digest(KEY)}}}, query: 'a&b'}}}}", "api_key.query", "query"),
        (f'{{api_key: {{keys: {{a: {digest(KEY)}}}, realm: "a\\"b"}}}}', "api_key.realm", '"'),
        ("{api_key: {keys_file: missing.yaml}}", "api_key.keys_file", "no such file"),
    ],
    ids=["no-keys", "bad-digest", "both", "authorization", "owned", "query", "realm", "file"],
)
def test_config_errors_name_the_yaml_path(
    tmp_path: Path, stage: str, path: str, message: str
) -> None:
    errors = errors_of(route_with(f"[{stage}]"), tmp_path)
    where = f"routes[0].pipeline[0].{path}: "
    assert any(e.startswith(where) and message in e for e in errors), errors


# -- rules between stages -----------------------------------------------------------------------

API = f"{{api_key: {{keys: {{a: {digest(KEY)}}}}}}}"
BASIC = "{basic_auth: {users: ['u:$2b$04$' + 'a' * 53]}}"


@pytest.mark.parametrize(
    ("pipeline", "where", "message"),
    [
        (
            "[{rate_limit: {rate: 1, key: consumer}}]",
            "pipeline[0]",
            "rate-limit key consumer needs an api_key or basic_auth stage before it",
        ),
        (
            f"[{{rate_limit: {{rate: 1, key: [route, consumer]}}}}, {API}]",
            "pipeline[0]",
            "rate-limit key consumer needs an api_key or basic_auth stage before it",
        ),
        (
            "[{idempotency: {scope: consumer}}]",
            "pipeline[0]",
            "idempotency scope consumer needs an api_key or basic_auth stage",
        ),
        (
            "[{idempotency: {token: {secret: " + "s" * 32 + ", client_id: consumer}}}]",
            "pipeline[0]",
            "token client_id consumer needs an api_key or basic_auth stage before it",
        ),
        (
            f"[{{idempotency: {{}}}}, {API}]",
            "pipeline[0]",
            "idempotency must come after the api_key stage",
        ),
        (
            f"[{API}, {{rate_limit: {{rate: 1, key: 'header:X-API-Key'}}}}]",
            "pipeline[1]",
            "header:x-api-key is removed by the api_key stage before it",
        ),
        (
            f"[{API}, {{rate_limit: {{rate: 1, key: 'header:X-Consumer'}}}}]",
            "pipeline[1]",
            "is the client's copy of X-Consumer",
        ),
        (
            "[{rate_limit: {rate: 1, key: 'header:x-consumer'}}]",
            "pipeline[0]",
            "is the client's copy of X-Consumer",
        ),
        (
            f"[{API}, {API}]",
            "pipeline[1]",
            "a route authenticates one consumer: api_key cannot follow the api_key stage",
        ),
    ],
    ids=[
        "consumer-alone",
        "consumer-before",
        "scope-alone",
        "token-client-id",
        "idempotency-before",
        "hidden-header",
        "x-consumer",
        "x-consumer-alone",
        "two",
    ],
)
def test_pipeline_rules(pipeline: str, where: str, message: str) -> None:
    errors = errors_of(route_with(pipeline))
    assert any(e.startswith(f"routes[0].{where}") and message in e for e in errors), errors


def test_consumer_keys_and_scopes_after_an_api_key_stage() -> None:
    config = parse_config(
        BASE
        + route_with(
            f"[{API}, {{rate_limit: {{rate: 1, key: [consumer, route]}}}}, {{idempotency: {{}}}}]"
        )
        + f"  - {{name: r2, upstream: u, pipeline: [{{api_key: {{keys: {{a: {digest(KEY)}}},"
        " hide_credentials: false}}, {rate_limit: {rate: 1, key: 'header:X-API-Key'}}]}\n",
        env={},
    )
    first = config.routes[0].pipeline
    assert [s.kind for s in first] == ["api_key", "rate_limit", "idempotency"]
    assert first[1].config.key == ("consumer", "route")
    # scope: auto resolves to the consumer after an api_key stage
    assert first[2].config.scope == "consumer"


# -- the stage ----------------------------------------------------------------------------------


def _stage(**options: object) -> tuple[ApiKeyStage, GatewayMetrics]:
    metrics = GatewayMetrics(Registry())
    keys = ((hashlib.sha256(KEY.encode()).digest(), "billing"),)
    config = ApiKeyConfig(keys=keys, **options)  # type: ignore[arg-type]
    return ApiKeyStage(config, StageOutcomes(metrics.stage_total, "api_key")), metrics


def _head(target: str = "/x", headers: list[tuple[bytes, bytes]] | None = None) -> RequestHead:
    head = RequestHead()
    head.method = "GET"
    head.target = target.encode()
    head.path, _, head.query = target.partition("?")
    head.plain_target = True
    head.replace_headers(headers or [])
    return head


class Seen:
    def __init__(self) -> None:
        self.contexts: list[RequestContext] = []

    async def __call__(self, ctx: RequestContext) -> Response:
        self.contexts.append(ctx)
        return Response(200, [], b"")


def _counted(metrics: GatewayMetrics, outcome: str) -> float:
    return metrics.stage_total.labels("app", "api_key", outcome).value


async def test_a_known_key_in_the_header_names_the_consumer() -> None:
    stage, metrics = _stage()
    head = _head(headers=[(b"X-Api-Key", KEY.encode()), (b"x_api_key", b"other"), (b"A", b"b")])
    ctx = make_context(head)
    seen = Seen()
    response = await stage(ctx, seen)
    assert response.status == 200
    assert seen.contexts == [ctx]
    assert ctx.consumer == "billing"
    assert identity_part("consumer")(ctx) == "billing"
    assert ctx.upstream_headers == [(b"X-Consumer", b"billing")]
    # hidden: no spelling of the key's header goes on, the rest does
    assert head.headers == [(b"A", b"b")]
    assert ctx.outcomes == {"api_key": "allowed"}
    assert _counted(metrics, "allowed") == 1


async def test_missing_and_invalid_keys_are_401_with_the_challenge() -> None:
    stage, metrics = _stage()
    seen = Seen()
    for headers, outcome, detail in [
        ([], "missing", "an API key is required in the X-API-Key header"),
        ([(b"X-API-Key", b"")], "missing", "required"),
        ([(b"X-API-Key", OTHER.encode())], "invalid", "the API key is not valid"),
        ([(b"X-API-Key", KEY.upper().encode())], "invalid", "not valid"),
    ]:
        ctx = make_context(_head(headers=headers))
        with pytest.raises(Unauthenticated) as info:
            await stage(ctx, seen)
        assert info.value.status == 401
        assert detail in info.value.detail
        assert info.value.headers == (
            ("WWW-Authenticate", 'ApiKey realm="gateway", in="header", name="X-API-Key"'),
        )
        assert ctx.outcomes == {"api_key": outcome}
        assert ctx.consumer is None
        assert ctx.upstream_headers is None
        assert OTHER not in info.value.detail
    assert seen.contexts == []
    assert _counted(metrics, "missing") == 2
    assert _counted(metrics, "invalid") == 2


@pytest.mark.parametrize(
    ("spelling", "value", "outcome"),
    [
        (b"X-API-Key", KEY.encode(), "allowed"),
        (b"X-API-Key", KEY.encode() + b" ", "allowed"),  # "k" and "k " are one key
        (b"x-api-key", KEY.encode() + b"\t", "allowed"),
        (b"X-API-KEY", b" " + KEY.encode(), "allowed"),
        (b"X-API-Key", b"\t" + KEY.encode() + b" \t", "allowed"),
        (b"X-API-Key", b" \t ", "missing"),
        (b"X-API-Key", b"k", "invalid"),
    ],
)
async def test_a_key_is_read_in_any_spelling_of_the_name_and_without_blanks_around_it(
    spelling: bytes, value: bytes, outcome: str
) -> None:
    stage, metrics = _stage()
    head = _head(headers=[(b"Host", b"a"), (spelling, value), (b"Origin", b"o")])
    ctx = make_context(head)
    if outcome == "allowed":
        await stage(ctx, Seen())
        assert ctx.consumer == "billing"
    else:
        with pytest.raises(Unauthenticated):
            await stage(ctx, Seen())
    assert ctx.outcomes == {"api_key": outcome}
    assert _counted(metrics, outcome) == 1
    assert head.headers == [(b"Host", b"a"), (b"Origin", b"o")]  # hidden either way
    assert head.header_classes() == [received_name_class(n) for n, _ in head.headers]


async def test_two_key_headers_are_a_bad_request() -> None:
    stage, _ = _stage()
    head = _head(headers=[(b"X-API-Key", KEY.encode()), (b"x-api-key", KEY.encode())])
    ctx = make_context(head)
    with pytest.raises(BadRequest):
        await stage(ctx, Seen())
    assert ctx.outcomes == {"api_key": "invalid"}


async def test_hide_credentials_false_forwards_the_key() -> None:
    stage, _ = _stage(hide_credentials=False)
    head = _head(headers=[(b"X-API-Key", KEY.encode())])
    await stage(make_context(head), Seen())
    assert head.headers == [(b"X-API-Key", KEY.encode())]


@pytest.mark.parametrize(
    ("target", "kept"),
    [
        (f"/x?a=1&api_key={KEY}&b=2", "/x?a=1&b=2"),
        (f"/x?api_key={KEY}", "/x"),
        (f"/x?api%5Fkey={KEY}&z", "/x?z"),
        (f"/x?b=%20&api_key={KEY.replace('-', '%2D')}", "/x?b=%20"),
    ],
    ids=["middle", "alone", "encoded-name", "encoded-value"],
)
async def test_a_key_in_the_query_is_cut_from_the_target(target: str, kept: str) -> None:
    stage, _ = _stage(query="api_key")
    head = _head(target)
    ctx = make_context(head)
    await stage(ctx, Seen())
    assert ctx.consumer == "billing"
    assert head.target == kept.encode()
    assert head.query == kept.partition("?")[2]
    assert KEY not in head.query


async def test_a_key_in_the_query_twice_or_missing() -> None:
    stage, _ = _stage(query="api_key")
    head = _head(f"/x?api_key={KEY}&api_key={OTHER}")
    with pytest.raises(Unauthenticated) as info:
        await stage(make_context(head), Seen())
    assert "more than once" in info.value.detail
    assert KEY not in head.target.decode()
    assert OTHER not in head.target.decode()
    for target in ("/x", "/x?other=1", "/x?api_key=", f"/x?key={KEY}"):
        with pytest.raises(Unauthenticated) as info:
            await stage(make_context(_head(target)), Seen())
        assert info.value.headers == (
            ("WWW-Authenticate", 'ApiKey realm="gateway", in="query", name="api_key"'),
        )


@pytest.mark.parametrize("builtin", [True, False], ids=["cpython-sha256", "openssl-copy"])
def test_a_key_is_hashed_as_sha256_by_either_implementation(
    builtin: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage hashes with CPython's own sha256 where it exists, else with a copy of an empty
    OpenSSL one: either way the digest a config names (printf %s KEY | sha256sum)."""
    if not builtin:

        def no_module(name: str) -> object:
            raise ImportError(name)

        monkeypatch.setattr(api_key.importlib, "import_module", no_module)
    sha256_of = api_key._sha256_of()
    keys = [b"", b"k", b"bench-api-key", b"\xff" * 55, b"x" * 56, b"y" * 64, b"z" * 1000]
    for key in keys:
        assert sha256_of(key).digest() == hashlib.sha256(key).digest()
    # each call starts afresh: nothing of one key is left in the next one's digest
    assert sha256_of(b"a").digest() == hashlib.sha256(b"a").digest()
