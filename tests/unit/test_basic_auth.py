"""The `basic_auth` stage: which htpasswd hashes are accepted and why others are refused, the
users file's errors (by line, never quoting a hash), password checks for bcrypt and argon2id,
the dummy hash that makes an unknown user cost a full check, and the stage's decisions — the
cache, the same path for unknown users and wrong passwords, the bounded check queue."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from pathlib import Path

import argon2
import bcrypt
import pytest

from gateway.errors import ConfigErrors, Unauthenticated
from gateway.http.messages import RequestHead, Response
from gateway.observability.exposition import Registry
from gateway.observability.metrics import GatewayMetrics
from gateway.pipeline import RequestContext
from gateway.stages import basic_auth
from gateway.stages.basic_auth import (
    AuthBusy,
    BasicAuthConfig,
    BasicAuthStage,
    check_hash,
    check_password,
    dummy_hash,
)
from gateway.stages.outcomes import StageOutcomes
from tests.support.config import load_config
from tests.support.context import make_context
from tests.support.process import async_wait_until

#: cost 4, the lowest: these tests check behaviour, not strength
ALICE = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$")
BOB = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("builder")

BASE = """
listeners: [{name: http, bind: "127.0.0.1:8080"}]
upstreams:
  u: {endpoints: [{url: "http://127.0.0.1:9001"}]}
"""


# -- hashes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hashed",
    [
        ALICE,
        ALICE.replace("$2y$", "$2b$"),
        ALICE.replace("$2y$", "$2a$"),
        BOB,
    ],
    ids=["2y", "2b", "2a", "argon2id"],
)
def test_accepted_hashes(hashed: str) -> None:
    assert check_hash(hashed) is None


@pytest.mark.parametrize(
    ("hashed", "why"),
    [
        ("$apr1$abcdefgh$0123456789abcdefghijkl", "an MD5 (apr1) hash is refused"),
        ("{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=", "a SHA-1 hash is refused"),
        ("$1$salt$hash", "an MD5-crypt hash is refused"),
        ("$6$salt$hash", "a SHA-512-crypt hash is refused"),
        ("abJnggxhB/yWI", "not a bcrypt or argon2id hash (plain text and crypt(3)"),
        ("wonderland", "not a bcrypt or argon2id hash"),
        (ALICE.replace("$2y$", "$2x$"), "$2x$ hash (the variant with the 8-bit bug)"),
        (BOB.replace("argon2id", "argon2i"), "only argon2id is accepted"),
        (BOB.replace("argon2id", "argon2d"), "only argon2id is accepted"),
        (ALICE.replace("$04$", "$15$"), "bcrypt cost 15 is outside 4-14"),
        (ALICE.replace("$04$", "$03$"), "bcrypt cost 3 is not a valid cost"),
        (ALICE[:-1], "not a well-formed bcrypt hash"),
        (BOB.replace("m=8,", "m=1048576,"), "exceed m=262144"),
        ("$argon2id$v=19$nonsense", "not a well-formed argon2id hash"),
    ],
    ids=[
        "apr1",
        "sha1",
        "md5-crypt",
        "sha512-crypt",
        "des-crypt",
        "plain",
        "2x",
        "argon2i",
        "argon2d",
        "cost-high",
        "cost-low",
        "truncated",
        "argon2-memory",
        "argon2-garbled",
    ],
)
def test_refused_hashes_say_why(hashed: str, why: str) -> None:
    problem = check_hash(hashed)
    assert problem is not None
    assert why in problem
    assert hashed not in problem


def test_check_password_for_each_scheme() -> None:
    assert check_password(ALICE, b"wonderland")
    assert check_password(ALICE.replace("$2y$", "$2b$"), b"wonderland")
    assert not check_password(ALICE, b"Wonderland")
    assert check_password(BOB, b"builder")
    assert not check_password(BOB, b"builde")
    assert not check_password(BOB, b"")


def test_bcrypt_reads_the_first_72_bytes_as_htpasswd_did() -> None:
    long = b"x" * 72
    hashed = bcrypt.hashpw(long, bcrypt.gensalt(4)).decode()
    # pyca/bcrypt refuses a longer password outright; we cut it as the hash was made
    assert check_password(hashed, long + b"tail")


def test_the_dummy_hash_has_the_usual_shape_and_matches_nothing() -> None:
    other = bcrypt.hashpw(b"pw", bcrypt.gensalt(5)).decode()
    dummy = dummy_hash([ALICE, ALICE, other])
    assert dummy.startswith("$2y$04$")
    assert check_hash(dummy) is None
    assert dummy != dummy_hash([ALICE])  # a fresh salt each time
    for password in (b"", b"wonderland", b"pw"):
        assert not check_password(dummy, password)
    dummy = dummy_hash([BOB])
    assert check_hash(dummy) is None
    assert argon2.extract_parameters(dummy) == argon2.extract_parameters(BOB)
    assert not check_password(dummy, b"builder")
    # no users yet: bcrypt at cost 10
    assert dummy_hash([]).startswith("$2b$10$")


# -- config -------------------------------------------------------------------------------------


def _load(tmp_path: Path, stage: str, users: str | None = None) -> BasicAuthConfig:
    if users is not None:
        (tmp_path / "users.htpasswd").write_text(users)
    (tmp_path / "gateway.yaml").write_text(
        BASE + f"routes:\n  - {{name: r, upstream: u, pipeline: [{stage}]}}\n"
    )
    [spec] = load_config(tmp_path / "gateway.yaml", env={}).routes[0].pipeline
    assert isinstance(spec.config, BasicAuthConfig)
    return spec.config


def _errors(tmp_path: Path, stage: str, users: str | None = None) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        _load(tmp_path, stage, users)
    return [str(e) for e in info.value.errors]


def test_users_from_the_file_and_the_config(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        "{basic_auth: {users_file: users.htpasswd, users: ['carol:" + ALICE + "'], realm: ops}}",
        f"# operators\nalice:{ALICE}\n\nbob:{BOB}\r\n",
    )
    assert config.users == (("alice", ALICE), ("bob", BOB), ("carol", ALICE))
    assert config.realm == "ops"
    assert config.users_file == str(tmp_path / "users.htpasswd")
    assert ALICE not in repr(config)
    assert "<3 users>" in repr(config)


def test_users_file_errors_by_line_never_quoting_a_hash(tmp_path: Path) -> None:
    errors = _errors(
        tmp_path,
        "{basic_auth: {users_file: users.htpasswd}}",
        f"alice:{ALICE}\nbob:$apr1$abcdefgh$0123456789abcdefghijkl\nno-colon\n"
        f"alice:{ALICE}\n:{ALICE}\ncarol:wonderland\n",
    )
    where = "routes[0].pipeline[0].basic_auth.users_file: "
    assert errors == [
        where + "line 2: user 'bob': an MD5 (apr1) hash is refused: rehash the password"
        " with bcrypt (htpasswd -B) or argon2id",
        where + "line 3: is not user:hash",
        where + "line 4: user 'alice' is listed twice (first at line 1)",
        where + "line 5: is not user:hash",
        where + "line 6: user 'carol': not a bcrypt or argon2id hash (plain text and"
        " crypt(3) are refused): rehash the password with bcrypt (htpasswd -B) or argon2id",
    ]
    assert not any("wonderland" in e or ALICE in e for e in errors)


@pytest.mark.parametrize(
    ("stage", "where", "message"),
    [
        ("{basic_auth: {}}", "basic_auth", "needs users_file or users"),
        ("{basic_auth: {users: []}}", "basic_auth.users", "must be a list of htpasswd lines"),
        ("{basic_auth: {users: ['alice:x']}}", "basic_auth.users[0]", "user 'alice': not a"),
        ("{basic_auth: {users_file: nope}}", "basic_auth.users_file", "no such file"),
        (
            "{basic_auth: {users: ['a:" + ALICE + "'], cache_ttl: -1s}}",
            "basic_auth.cache_ttl",
            "must be a duration",
        ),
        (
            "{basic_auth: {users: ['a:" + ALICE + "'], realm: ''}}",
            "basic_auth.realm",
            "1-128 visible ASCII",
        ),
    ],
    ids=["no-users", "empty-list", "plain", "file", "ttl", "realm"],
)
def test_config_errors_name_the_yaml_path(
    tmp_path: Path, stage: str, where: str, message: str
) -> None:
    errors = _errors(tmp_path, stage)
    assert any(e.startswith(f"routes[0].pipeline[0].{where}: ") and message in e for e in errors), (
        errors
    )


def test_basic_auth_and_jwt_cannot_share_a_route(tmp_path: Path) -> None:
    jwt = "{jwt: {algorithms: [HS256], secret: " + "s" * 32 + "}}"
    basic = "{basic_auth: {users: ['a:" + ALICE + "']}}"
    for pipeline in (f"{jwt}, {basic}", f"{basic}, {jwt}"):
        errors = _errors(tmp_path, pipeline)
        assert any("basic_auth and jwt both read the Authorization header" in e for e in errors)
    api = "{api_key: {keys: {k: " + "a" * 64 + "}}}"
    errors = _errors(tmp_path, f"{api}, {basic}")
    assert any("basic_auth cannot follow the api_key stage" in e for e in errors), errors
    errors = _errors(tmp_path, f"{basic}, {{rate_limit: {{rate: 1, key: 'header:Authorization'}}}}")
    assert any("header:authorization is removed by the basic_auth stage" in e for e in errors)


# -- the stage ----------------------------------------------------------------------------------


class Checks:
    """check_password, recorded: which hashes the pool was given."""

    def __init__(self) -> None:
        self.hashes: list[str] = []
        self.threads: set[str] = set()

    def __call__(self, hashed: str, password: bytes) -> bool:
        self.hashes.append(hashed)
        self.threads.add(threading.current_thread().name)
        return check_password(hashed, password)


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[Checks]:
    recorded = Checks()
    monkeypatch.setattr(basic_auth, "check_password", recorded)
    return recorded


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(basic_auth, "monotonic", fake)
    return fake


def _stage(**options: object) -> tuple[BasicAuthStage, GatewayMetrics]:
    metrics = GatewayMetrics(Registry())
    config = BasicAuthConfig(users=(("alice", ALICE), ("bob", BOB)), **options)  # type: ignore[arg-type]
    return BasicAuthStage(config, StageOutcomes(metrics.stage_total, "basic_auth")), metrics


def _ctx(authorization: bytes | None, *more: tuple[bytes, bytes]) -> RequestContext:
    head = RequestHead()
    head.method = "GET"
    headers = [(b"Authorization", authorization)] if authorization is not None else []
    head.replace_headers([*headers, *more])
    return make_context(head)


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


async def _next(ctx: RequestContext) -> Response:
    return Response(200, [], b"")


def _count(metrics: GatewayMetrics, outcome: str) -> float:
    return metrics.stage_total.labels("app", "basic_auth", outcome).value


async def test_a_good_password_names_the_consumer_off_the_loop(checks: Checks) -> None:
    stage, metrics = _stage()
    ctx = _ctx(basic("alice", "wonderland"), (b"X-Other", b"1"))
    assert (await stage(ctx, _next)).status == 200
    assert ctx.consumer == "alice"
    assert ctx.upstream_headers == [(b"X-Consumer", b"alice")]
    assert ctx.head.headers == [(b"X-Other", b"1")]  # hide_credentials
    assert ctx.head.authorization is None
    assert ctx.outcomes == {"basic_auth": "allowed"}
    assert checks.hashes == [ALICE]
    # the check ran on the pool, not on the event loop's thread
    assert checks.threads
    assert all(t.startswith("basic-auth") for t in checks.threads)
    bob = _ctx(basic("bob", "builder"))
    assert (await stage(bob, _next)).status == 200
    assert bob.consumer == "bob"
    assert _count(metrics, "allowed") == 2


async def test_an_unknown_user_takes_the_wrong_password_path(checks: Checks) -> None:
    """Structural, not by the clock: both are one check on the pool, of a hash of the same
    scheme and cost — the user's own, or the dummy — and the same answer."""
    stage, metrics = _stage()
    answers = []
    for user, password in (("alice", "wrong"), ("mallory", "wrong"), ("mallory", "wonderland")):
        ctx = _ctx(basic(user, password))
        with pytest.raises(Unauthenticated) as info:
            await stage(ctx, _next)
        answers.append((info.value.status, info.value.detail, info.value.headers, ctx.outcomes))
        assert ctx.consumer is None
        assert ctx.upstream_headers is None
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][2] == (("WWW-Authenticate", 'Basic realm="gateway", charset="UTF-8"'),)
    dummy = stage._dummy
    assert checks.hashes == [ALICE, dummy, dummy]
    assert dummy[:7] == ALICE[:7]  # the same scheme and cost as the users' hashes
    assert _count(metrics, "invalid") == 3


async def test_verified_credentials_are_cached_and_failures_never(
    checks: Checks, clock: Clock
) -> None:
    stage, _ = _stage(cache_ttl=60.0)
    for _ in range(3):
        ctx = _ctx(basic("alice", "wonderland"))
        assert (await stage(ctx, _next)).status == 200
        assert ctx.consumer == "alice"
        assert ctx.upstream_headers == [(b"X-Consumer", b"alice")]
    assert checks.hashes == [ALICE]  # one check for three requests
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            await stage(_ctx(basic("alice", "guess")), _next)
    assert checks.hashes == [ALICE, ALICE, ALICE]  # each failure checked in full
    cache = stage._cache
    assert len(cache) == 1
    # keyed by an HMAC: neither the password nor the user is in the cache's keys
    [key] = cache
    assert b"wonderland" not in key
    assert len(key) == 32
    clock.now += 61  # past cache_ttl: checked again
    assert (await stage(_ctx(basic("alice", "wonderland")), _next)).status == 200
    assert checks.hashes == [ALICE, ALICE, ALICE, ALICE]
    stage.forget()  # a reload replaced the stage
    assert (await stage(_ctx(basic("alice", "wonderland")), _next)).status == 200
    assert len(checks.hashes) == 5


async def test_the_cache_is_bounded_and_can_be_off(checks: Checks) -> None:
    stage, _ = _stage(cache_size=1)
    for user, password in (("alice", "wonderland"), ("bob", "builder"), ("alice", "wonderland")):
        assert (await stage(_ctx(basic(user, password)), _next)).status == 200
    assert checks.hashes == [ALICE, BOB, ALICE]  # alice was evicted by bob
    stage, _ = _stage(cache_ttl=0.0)
    for _ in range(2):
        assert (await stage(_ctx(basic("alice", "wonderland")), _next)).status == 200
    assert checks.hashes[3:] == [ALICE, ALICE]


@pytest.mark.parametrize(
    ("authorization", "outcome"),
    [
        (None, "missing"),
        (b"Bearer abc", "missing"),
        (b"Basic", "invalid"),
        (b"Basic !!!", "invalid"),
        (b"Basic " + base64.b64encode(b"alice"), "invalid"),
        (b"Basic " + base64.b64encode(b":wonderland"), "invalid"),
        (b"Basic " + base64.b64encode(b"\xff:x"), "invalid"),
    ],
    ids=["none", "bearer", "empty", "not-base64", "no-colon", "no-user", "not-utf8"],
)
async def test_missing_and_malformed_credentials(
    checks: Checks, authorization: bytes | None, outcome: str
) -> None:
    stage, metrics = _stage(realm="ops team")
    ctx = _ctx(authorization)
    with pytest.raises(Unauthenticated) as info:
        await stage(ctx, _next)
    assert info.value.headers == (("WWW-Authenticate", 'Basic realm="ops team", charset="UTF-8"'),)
    assert ctx.outcomes == {"basic_auth": outcome}
    assert checks.hashes == []  # nothing to check
    assert _count(metrics, outcome) == 1


async def test_scheme_in_any_case_and_credentials_kept_when_asked(checks: Checks) -> None:
    stage, _ = _stage(hide_credentials=False)
    value = b"bAsIc " + base64.b64encode(b"alice:wonderland")
    ctx = _ctx(value)
    assert (await stage(ctx, _next)).status == 200
    assert ctx.head.authorization == value


async def test_past_the_queue_a_check_is_503_busy(
    checks: Checks, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage, metrics = _stage(cache_ttl=60.0)
    assert (await stage(_ctx(basic("alice", "wonderland")), _next)).status == 200
    verifier = basic_auth.VERIFIER
    monkeypatch.setattr(verifier, "in_flight", verifier.limit)
    ctx = _ctx(basic("bob", "builder"))
    with pytest.raises(AuthBusy) as info:
        await stage(ctx, _next)
    assert info.value.status == 503
    assert info.value.code == "auth_busy"
    assert ("Retry-After", "1") in info.value.headers
    assert ctx.outcomes == {"basic_auth": "busy"}
    assert _count(metrics, "busy") == 1
    # credentials already verified need no check: served from the cache while the pool is full
    assert (await stage(_ctx(basic("alice", "wonderland")), _next)).status == 200


async def test_the_pool_bounds_checks_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checks beyond the pool's threads wait; past `limit` in flight, submit says no; a check
    whose request went away still counts until its thread is done."""
    release = threading.Event()

    def slow(hashed: str, password: bytes) -> bool:
        release.wait(10)
        return False

    monkeypatch.setattr(basic_auth, "check_password", slow)
    verifier = basic_auth._Verifier(threads=1)
    verifier.limit = 2
    first = verifier.submit("h", b"p")
    second = verifier.submit("h", b"p")
    assert first is not None
    assert second is not None
    assert verifier.submit("h", b"p") is None
    waiting = asyncio.wrap_future(second)
    waiting.cancel()  # the second's client left: it never started, so it is dropped at once
    release.set()
    assert await asyncio.wrap_future(first) is False
    await async_wait_until(lambda: verifier.in_flight == 0, within=5, what="checks done")
    assert verifier.submit("h", b"p") is not None


def test_a_refused_user_is_the_only_error(tmp_path: Path) -> None:
    """The stage stays in the pipeline's checks when its users file is refused: the consumer
    key after it is not reported as lacking an authenticating stage."""
    errors = _errors(
        tmp_path,
        "{basic_auth: {users_file: users.htpasswd}}, {rate_limit: {rate: 1, key: consumer}}",
        "bob:$apr1$abcdefgh$0123456789abcdefghijkl\n",
    )
    assert len(errors) == 1
    assert "line 1: user 'bob': an MD5 (apr1) hash is refused" in errors[0]
