"""The `basic_auth` stage (SPEC §5.8): HTTP Basic authentication (RFC 7617) against htpasswd
hashes, or 401 with `WWW-Authenticate: Basic realm="...", charset="UTF-8"`.

Users come from `users_file` (an htpasswd file: `user:hash` a line, `#` comments) and/or `users`
(the same lines in the config, where `${ENV}` can supply them).  Only slow, salted hashes are
accepted: bcrypt (`$2y$`, `$2b$`, `$2a$`, as `htpasswd -B` writes) and argon2id
(`$argon2id$`).  MD5 (`$apr1$`), SHA-1 (`{SHA}`), crypt(3) and plain text are refused at load with
the line that has one: a fast hash turns a leaked users file into every password.  The file is
read with the config, so it is watched like every file the config references: a change is a
reload that builds a new stage (with an empty cache), an invalid file is a reload error and the
users in force stay in force.

Checking a password costs 50-300 ms of CPU by design, so it never runs on the event loop: a
process-wide pool of threads does it (`_Verifier`: about half the CPUs, the rest stay the
proxy's), with a bounded queue — past it a new check is refused with 503 `auth_busy` and
`Retry-After`, so a flood of guesses cannot queue without end or starve the loop.  A user that
does not exist costs the same as a wrong password: the password is checked against a dummy hash
of the same scheme and cost, through the same code path, and only then refused.

Verified credentials are remembered (`cache_ttl`, `cache_size`), so a client sending the same
credentials on every request — every Basic client does — pays for one check per `cache_ttl`, not
per request.  Why that is safe:
- the cache key is a keyed hash (BLAKE2b's MAC mode, RFC 7693) of the credentials as sent,
  keyed with 32 random bytes drawn when the stage is built: the cache holds no password and no
  unkeyed fast hash of one (which could be brute-forced off a memory dump far faster than the
  bcrypt hashes it stands for); the key dies with the stage;
- only a successful check is ever stored, so a failed guess is checked in full every time and a
  wrong password can never be found in the cache;
- a changed users file (a password changed, a user removed) is a new stage with a new, empty
  cache: nothing verified against the old file outlives it; entries also expire after
  `cache_ttl`;
- the lookup compares keyed digests the client cannot steer, so its timing says nothing about
  how close a guess is (see api_key's note); an attacker can only learn that a pair is cached by
  sending the right password.
The process that checks passwords sees each one in every request anyway: a memory dump taken
while it serves holds the Authorization headers of the requests in flight, with or without
this cache.

An accepted user is the consumer: `ctx.consumer`, and `X-Consumer` upstream.  With
`hide_credentials` (default true) the Authorization header is not forwarded: the password is the
gateway's business, the upstream is told who it was.  Decisions are counted in
`gateway_stage_total{route,stage="basic_auth",outcome}` (allowed, missing, invalid, busy) and named
in the access log.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import re
import secrets
import threading
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Awaitable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from hashlib import blake2b
from time import monotonic
from typing import Any, Final, final

import argon2
import bcrypt

from gateway.config.model import StageSpec
from gateway.config.reader import Fields, Reader, as_bool, positive_int
from gateway.config.stages import PipelineCheck
from gateway.config.units import parse_duration
from gateway.errors import ConfigError, GatewayError, Unauthenticated
from gateway.http.messages import Response
from gateway.pipeline import Next, RequestContext
from gateway.stages import credentials
from gateway.stages.kind import BuildContext, StageKind
from gateway.stages.outcomes import StageOutcomes

_KIND: Final = "basic_auth"


class AuthBusy(GatewayError):
    """More password checks are waiting than the pool may queue: try again shortly."""

    status, code, title = 503, "auth_busy", "Service Unavailable"


@dataclass(frozen=True, slots=True, kw_only=True)
class BasicAuthConfig:
    users_file: str | None = None
    #: (user, hash), from `users_file` and `users`, sorted
    users: tuple[tuple[str, str], ...] = ()
    realm: str = "gateway"
    #: the Authorization header is not forwarded upstream
    hide_credentials: bool = True
    #: how long a verified user:password is remembered (0: every request is checked in full)
    cache_ttl: float = 300.0
    cache_size: int = 10_000

    def __repr__(self) -> str:
        # hashes of weak passwords can be cracked: they never go into a log line
        return f"BasicAuthConfig(realm={self.realm!r}, users=<{len(self.users)} users>)"


EXAMPLE: Final = """\
realm: operations
# htpasswd -nbB ops 'PASSWORD' (bcrypt); an argon2id hash ($argon2id$...) works too
users: ["ops:$2y$10$/Te0Za9CfPtMT2Tl5DRLPeYIY.pKMZ96L22crfhrja0AixbmPK82q"]
hide_credentials: true
"""

# -- hashes -----------------------------------------------------------------------------------

_BCRYPT: Final = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
#: above this a single check takes seconds of CPU: a config mistake that would let every
#: request with a password take a thread for that long
_MAX_BCRYPT_COST: Final = 14
_MAX_ARGON2_MEMORY_KIB: Final = 256 * 1024
_MAX_ARGON2_TIME: Final = 10
_MAX_ARGON2_LANES: Final = 8

#: refused schemes, by prefix, with why
_REFUSED: Final = (
    ("$apr1$", "an MD5 (apr1) hash"),
    ("{SHA}", "a SHA-1 hash"),
    ("$1$", "an MD5-crypt hash"),
    ("$5$", "a SHA-256-crypt hash"),
    ("$6$", "a SHA-512-crypt hash"),
    ("$2x$", "a bcrypt $2x$ hash (the variant with the 8-bit bug)"),
    ("$argon2i$", "an argon2i hash (only argon2id is accepted)"),
    ("$argon2d$", "an argon2d hash (only argon2id is accepted)"),
)
_REHASH: Final = "rehash the password with bcrypt (htpasswd -B) or argon2id"


def check_hash(hashed: str) -> str | None:
    """Why `hashed` is not accepted, or None when it is a bcrypt or argon2id hash with sane
    parameters.  Never quotes the hash."""
    match = _BCRYPT.match(hashed)
    if match:
        cost = int(match.group(1))
        if not 4 <= cost <= _MAX_BCRYPT_COST:
            return (
                f"bcrypt cost {cost} is outside 4-{_MAX_BCRYPT_COST} (each check would take"
                " too long; 10-12 is usual)"
                if cost > _MAX_BCRYPT_COST
                else f"bcrypt cost {cost} is not a valid cost"
            )
        return None
    if hashed.startswith("$argon2id$"):
        try:
            params = argon2.extract_parameters(hashed)
        except argon2.exceptions.InvalidHashError:
            return "not a well-formed argon2id hash"
        if (
            params.memory_cost > _MAX_ARGON2_MEMORY_KIB
            or params.time_cost > _MAX_ARGON2_TIME
            or params.parallelism > _MAX_ARGON2_LANES
        ):
            return (
                f"argon2id parameters m={params.memory_cost},t={params.time_cost},"
                f"p={params.parallelism} exceed m={_MAX_ARGON2_MEMORY_KIB},"
                f"t={_MAX_ARGON2_TIME},p={_MAX_ARGON2_LANES} (each check would take too long)"
            )
        return None
    for prefix, what in _REFUSED:
        if hashed.startswith(prefix):
            return f"{what} is refused: {_REHASH}"
    if hashed.startswith("$2"):
        return "not a well-formed bcrypt hash"
    return f"not a bcrypt or argon2id hash (plain text and crypt(3) are refused): {_REHASH}"


_ARGON2: Final = argon2.PasswordHasher()
#: bcrypt reads at most 72 bytes of a password; htpasswd -B hashed only those, and pyca/bcrypt
#: refuses longer ones, so a longer password is cut as it was when its hash was made
_BCRYPT_MAX: Final = 72


def check_password(hashed: str, password: bytes) -> bool:
    """Whether `password` matches `hashed` (bcrypt or argon2id).  Slow by design: called on a
    worker thread, never on the event loop."""
    if hashed.startswith("$argon2"):
        try:
            return _ARGON2.verify(hashed, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
    try:
        return bcrypt.checkpw(password[:_BCRYPT_MAX], hashed.encode("ascii"))
    except ValueError:
        return False


_BCRYPT_ALPHABET: Final = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def dummy_hash(hashes: list[str]) -> str:
    """A hash that no password matches, of the scheme and cost most of `hashes` have, so that
    checking a password against it takes as long as against a real user's: the answer for an
    unknown user is then no faster than for a wrong password.

    Made without hashing anything (a reload must not spend a check's CPU on the loop): a real
    salt and a random digest, which the check computes in full and then finds different."""
    shapes: Tally[str] = Tally()
    for hashed in hashes:
        if hashed.startswith("$argon2id$"):
            params = argon2.extract_parameters(hashed)
            shapes[
                f"$argon2id$v={params.version}$m={params.memory_cost},t={params.time_cost},"
                f"p={params.parallelism}${params.salt_len}${params.hash_len}"
            ] += 1
        else:
            shapes[hashed[:7]] += 1  # "$2y$10$"
    shape = shapes.most_common(1)[0][0] if shapes else "$2b$10$"
    if shape.startswith("$argon2id$"):
        head, salt_len, hash_len = shape.rsplit("$", 2)
        return (
            f"{head}${_b64(secrets.token_bytes(int(salt_len)))}"
            f"${_b64(secrets.token_bytes(int(hash_len)))}"
        )
    salt = bcrypt.gensalt(int(shape[4:6]), prefix=b"2b").decode("ascii")[7:]
    digest = "".join(secrets.choice(_BCRYPT_ALPHABET) for _ in range(31))
    return f"{shape}{salt}{digest}"


# -- config -----------------------------------------------------------------------------------


def _line_user(line: str) -> tuple[str, str] | str:
    """(user, hash) of one htpasswd line, or why it is not one (never quoting the hash)."""
    user, sep, hashed = line.partition(":")
    if not sep or not user:
        return "is not user:hash"
    try:
        credentials.check_consumer(user, "")
    except ConfigError as exc:
        return f"user {user[:64]!r}: {exc.message.replace('consumer', 'user')}"
    problem = check_hash(hashed)
    if problem is not None:
        return f"user {user!r}: {problem}"
    return user, hashed


def _add_user(
    r: Reader,
    users: dict[str, tuple[str, str]],
    parsed: tuple[str, str],
    where: str,
    place: str,
    prefix: str = "",
) -> None:
    """Add a user read at `place` (a file's line, or a YAML path), refusing a second entry for
    it; errors at `where`, starting with `prefix`."""
    user, hashed = parsed
    first = users.get(user)
    if first is not None:
        r.error(where, f"{prefix}user {user!r} is listed twice (first at {first[1]})")
        return
    users[user] = (hashed, place)


def _read_users_file(r: Reader, file: str, path: str, users: dict[str, tuple[str, str]]) -> None:
    try:
        with open(file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        r.error(path, f"cannot read {file}: {type(exc).__name__}")
        return
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parsed = _line_user(line)
        if isinstance(parsed, str):
            r.error(path, f"line {number}: {parsed}")
        else:
            _add_user(r, users, parsed, path, f"line {number}", f"line {number}: ")


def _read_users(r: Reader, raw: object, path: str, users: dict[str, tuple[str, str]]) -> None:
    if not isinstance(raw, list) or not raw:
        r.error(path, 'must be a list of htpasswd lines, e.g. ["ops:$2y$10$..."]')
        return
    for i, item in enumerate(raw):
        where = f"{path}[{i}]"
        if not isinstance(item, str):
            r.error(where, "must be an htpasswd line user:hash")
            continue
        parsed = _line_user(item.strip())
        if isinstance(parsed, str):
            r.error(where, parsed)
        else:
            _add_user(r, users, parsed, where, where)


def _cache_ttl(value: object, path: str) -> float:
    ttl = parse_duration(value, path)
    if ttl < 0:
        raise ConfigError(path, "must not be negative")
    return ttl


_FIELDS: Final = Fields(
    BasicAuthConfig,
    {
        "realm": credentials.realm,
        "hide_credentials": as_bool,
        "cache_ttl": _cache_ttl,
        "cache_size": positive_int,
    },
    # read by `parse`: the users of both sources go into one field
    extra=("users_file", "users"),
)


def parse(r: Reader, raw: object, path: str) -> BasicAuthConfig | None:
    m = _FIELDS.mapping(r, raw, path)
    if m is None:
        return None
    errors = len(r.errors)
    values = _FIELDS.values(r, m, path)
    if m.get("users_file") is None and m.get("users") is None:
        r.error(path, "needs users_file or users (htpasswd lines with bcrypt or argon2id hashes)")
    if len(r.errors) > errors:
        return None
    # the stage is kept for the pipeline's checks even when a user is refused (the load fails
    # all the same): a `consumer` key after it is not reported as lacking one
    users: dict[str, tuple[str, str]] = {}
    if m.get("users") is not None:
        _read_users(r, m["users"], f"{path}.users", users)
    if m.get("users_file") is not None:
        where = f"{path}.users_file"
        found = r.resolve_file(m["users_file"], where)
        if found is not None:
            values["users_file"] = str(found)
            _read_users_file(r, str(found), where, users)
    # sorted: the same users are the same config, so a reload that changes nothing keeps the
    # stage (and its cache)
    values["users"] = tuple(sorted((user, hashed) for user, (hashed, _) in users.items()))
    return _FIELDS.create(r, values, path, len(r.errors))


def _check(check: PipelineCheck, config: BasicAuthConfig) -> BasicAuthConfig:
    jwt = [path for path, spec in check.after if spec.kind == "jwt"]
    if "jwt" in check.kinds_before or jwt:
        # each reads the one Authorization header: no request could satisfy both
        check.error("basic_auth and jwt both read the Authorization header: use one of them")
    credentials.check_pipeline(check, _KIND, "authorization" if config.hide_credentials else None)
    return config


def _upstream_headers(config: BasicAuthConfig) -> tuple[str, ...]:
    return (credentials.CONSUMER_HEADER,)


def _describe(config: BasicAuthConfig) -> dict[str, Any]:
    # never a user's hash, nor who the users are
    return {
        "realm": config.realm,
        "users": len(config.users),
        "hide_credentials": config.hide_credentials,
        "cache_ttl_seconds": config.cache_ttl,
    }


# -- checking passwords off the loop ----------------------------------------------------------


def _default_threads() -> int:
    """Half the CPUs this process may run on (at least one, at most four): a flood of password
    checks must leave the event loop CPU to proxy with."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 2
    return max(1, min(4, cpus // 2))


#: checks that may wait for a thread, beyond those running
_MAX_WAITING: Final = 64


@final
class _Verifier:
    """The process-wide pool that checks passwords: every basic_auth stage shares it, since what
    it bounds is CPU, which the routes share.  At most `threads` checks run and `_MAX_WAITING`
    wait; past that `submit` says no.  A check whose request went away still runs to its end
    (a thread cannot be interrupted) and counts until then, so the bound holds."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.limit = threads + _MAX_WAITING
        self.in_flight = 0
        self._lock = threading.Lock()  # `in_flight` changes on the loop and on worker threads
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, hashed: str, password: bytes) -> Future[bool] | None:
        with self._lock:
            if self.in_flight >= self.limit:
                return None
            self.in_flight += 1
            if self._pool is None:
                # threads start on demand and idle until the process exits
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="basic-auth")
            pool = self._pool
        # the module's check_password as it is now (tests observe which hash it is given)
        future = pool.submit(check_password, hashed, password)
        future.add_done_callback(self._done)
        return future

    def _done(self, _: Future[bool]) -> None:
        with self._lock:
            self.in_flight -= 1


VERIFIER: Final = _Verifier(_default_threads())

# -- the stage --------------------------------------------------------------------------------

_BASIC: Final = "basic"


def _basic_token(authorization: bytes) -> bytes | None:
    """The credentials of a `Basic` Authorization value (scheme in any case), or None when it
    uses another scheme."""
    scheme, _, rest = authorization.partition(b" ")
    if scheme.lower() != b"basic":
        return None
    return rest.strip(b" \t")


def _decoded(token: bytes) -> bytes | None:
    """`user:password` from base64, or None when it is not strictly base64."""
    try:
        return base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        return None


@final
class BasicAuthStage:
    __slots__ = (
        "_cache",
        "_cache_size",
        "_challenge",
        "_dummy",
        "_hide",
        "_outcomes",
        "_secret",
        "_ttl",
        "_users",
    )

    def __init__(self, config: BasicAuthConfig, outcomes: StageOutcomes) -> None:
        # user -> (hash, the user as the X-Consumer value)
        self._users: dict[str, tuple[str, bytes]] = {
            user: (hashed, user.encode("ascii")) for user, hashed in config.users
        }
        self._dummy = dummy_hash([hashed for _, hashed in config.users])
        self._challenge = [("WWW-Authenticate", f'Basic realm="{config.realm}", charset="UTF-8"')]
        self._hide = config.hide_credentials
        self._ttl = config.cache_ttl
        self._cache_size = config.cache_size
        # keyed hash of the credentials as sent -> (user, its X-Consumer value, expiry on the
        # monotonic clock); successes only
        self._cache: OrderedDict[bytes, tuple[str, bytes, float]] = OrderedDict()
        self._secret = secrets.token_bytes(32)
        self._outcomes = outcomes

    def __call__(self, ctx: RequestContext, call_next: Next) -> Awaitable[Response]:
        """The rest of the pipeline once the credentials are known good.  Not a coroutine:
        credentials verified recently (nearly every request of a Basic client) are settled here
        and the request goes on as the next stage's awaitable; only a check to make gets a
        coroutine, `_verify_then`, which waits for a thread.  A refusal raises at the call."""
        route = ctx.route.name
        authorization = ctx.head.authorization
        token = None if authorization is None else _basic_token(authorization)
        if token is None:
            raise self._refused(ctx, route, "missing", "a user name and password are required")
        # The cache key: the credentials as sent, under a keyed hash, so that the cache holds
        # nothing a password can be tested against without the stage's secret (module
        # docstring); a hit needs no decoding.  BLAKE2b's keyed mode is a MAC by design (RFC
        # 7693), as strong here as HMAC-SHA256 at half its cost, and this runs on every request.
        key = blake2b(token, key=self._secret, digest_size=32).digest()
        cached = self._cache.get(key)
        if cached is not None:
            if monotonic() < cached[2]:
                self._cache.move_to_end(key)
                self._admit(ctx, route, cached[0], cached[1])
                return call_next(ctx)
            del self._cache[key]
        decoded = _decoded(token)
        user_bytes, sep, password = (decoded or b"").partition(b":")
        try:
            user = user_bytes.decode("utf-8")
        except UnicodeDecodeError:
            user = ""
        if decoded is None or not sep or not user:
            raise self._refused(ctx, route, "invalid", "malformed Basic credentials")
        return self._verify_then(ctx, call_next, route, user, password, key)

    async def _verify_then(
        self,
        ctx: RequestContext,
        call_next: Next,
        route: str,
        user: str,
        password: bytes,
        key: bytes,
    ) -> Response:
        """Check the password on a worker thread, then go on.  A user that does not exist is
        checked against the dummy hash, by this same path: what differs between an unknown
        user and a wrong password is only which hash the thread is given."""
        found = self._users.get(user)
        hashed = self._dummy if found is None else found[0]
        future = VERIFIER.submit(hashed, password)
        if future is None:
            self._decided(ctx, route, "busy")
            raise AuthBusy(
                "too many password checks are waiting; try again shortly",
                headers=[("Retry-After", "1")],
            )
        matched = await asyncio.wrap_future(future)
        if not matched or found is None:
            raise self._refused(ctx, route, "invalid", "the user name or password is not valid")
        if self._ttl > 0:
            self._cache[key] = (user, found[1], monotonic() + self._ttl)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._admit(ctx, route, user, found[1])
        return await call_next(ctx)

    def _admit(self, ctx: RequestContext, route: str, user: str, forwarded: bytes) -> None:
        ctx.consumer = user
        ctx.add_upstream_header(credentials.CONSUMER_HEADER_BYTES, forwarded)
        if self._hide:
            head = ctx.head
            headers = head.headers
            for i, (name, _) in enumerate(headers):
                # the connection refused a second copy: the first found is the one; only a
                # name of Authorization's length is lowered
                if len(name) == 13 and name.lower() == b"authorization":
                    head.remove_headers([i])
                    break
        self._decided(ctx, route, "allowed")

    def _refused(
        self, ctx: RequestContext, route: str, outcome: str, detail: str
    ) -> Unauthenticated:
        self._decided(ctx, route, outcome)
        return Unauthenticated(detail, headers=self._challenge)

    def _decided(self, ctx: RequestContext, route: str, outcome: str) -> None:
        self._outcomes.count(route, outcome)
        ctx.outcome(_KIND, outcome)

    def forget(self) -> None:
        """Drop every remembered credential (a reload replaced the stage, or shutdown)."""
        self._cache.clear()


def build(config: BasicAuthConfig, spec: StageSpec, env: BuildContext) -> BasicAuthStage:
    return BasicAuthStage(config, StageOutcomes(env.metrics.stage_total, _KIND))


KIND: Final[StageKind[BasicAuthConfig, BasicAuthStage]] = StageKind(
    name=_KIND,
    parse=parse,
    build=build,
    example=EXAMPLE,
    check=_check,
    upstream_headers=_upstream_headers,
    describe=_describe,
    retire=BasicAuthStage.forget,
    close=BasicAuthStage.forget,
)
