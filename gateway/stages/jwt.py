"""The `jwt` stage (SPEC §5.2): a bearer token, verified, or 401 `unauthenticated`.

Keys come from a JWKS file (read when the stage is built; a changed file is a changed stage), a
JWKS URL (fetched with aiohttp off the request path, refreshed every `jwks_refresh`, and at
once — at most every `_MIN_REFETCH` seconds — when a token names a key id it does not know, which
is how key rotation reaches us), or an HMAC `secret`.  A JWKS entry that cannot verify tokens is
skipped, logged (kid and reason, never key material) and counted in
`gateway_jwt_keys_skipped_total{reason}` each time a set is read; the rest of the set works.  A
fetched set with no usable key leaves the keys we had in place, with `last_error` saying why, as
a failed fetch does: an issuer's bad publication must not log everyone out.

Verified tokens are remembered in a bounded LRU until their `exp` (never longer), keyed by the
exact token string, so a repeated token costs a dict lookup, not a signature check.  Claims go
into `ctx.claims` (rate-limit keys use them) and, per `forward_claims`, into headers for the
upstream; a client's own copies of those headers are always removed first, so they cannot be
spoofed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass
from time import time as wall_clock
from typing import Any, Final, final
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from gateway.bearer import bearer_credentials, names_bearer
from gateway.config.model import StageSpec
from gateway.config.reader import Fields, Nested, Reader, as_str, positive_duration, positive_int
from gateway.config.stages import PipelineCheck
from gateway.config.units import parse_duration
from gateway.core.jwt_tokens import (
    ALGORITHMS,
    HMAC_ALGORITHMS,
    JwksProblem,
    KeySet,
    Policy,
    SkippedKey,
    TokenRejected,
    VerifyingKey,
    hmac_key,
    read_jwks,
    verify,
)
from gateway.core.waiter import into_task
from gateway.errors import ConfigError, Unauthenticated
from gateway.http.messages import Response
from gateway.observability.instruments import Counter, CounterChild
from gateway.pipeline import Next, RequestContext
from gateway.stages.converters import OWNED_REQUEST, check_name, str_list
from gateway.stages.kind import BuildContext, StageKind

log = logging.getLogger("gateway.jwt")


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtConfig:
    issuer: str | None = None
    audiences: tuple[str, ...] = ()
    #: explicit, never taken from the token; all HMAC or all public-key
    algorithms: tuple[str, ...]
    jwks_file: str | None = None
    jwks_url: str | None = None
    secret: str | None = None
    #: sha256 of the JWKS file's content, so a changed file is a changed stage
    jwks_digest: str = ""
    leeway: float = 30.0
    required_claims: tuple[str, ...] = ()
    #: claim -> header sent upstream
    forward_claims: tuple[tuple[str, str], ...] = ()
    #: how often a jwks_url is fetched again
    jwks_refresh: float = 300.0
    #: verified tokens remembered (never past their exp)
    cache_size: int = 10_000

    def __repr__(self) -> str:
        # the secret must never reach a log line or an error message
        shown = "***" if self.secret else None
        return f"JwtConfig(issuer={self.issuer!r}, algorithms={self.algorithms!r}, secret={shown})"


EXAMPLE: Final = """\
issuer: https://idp.example.com/
audiences: [orders-api]
algorithms: [ES256]
jwks_url: https://idp.example.com/.well-known/jwks.json
forward_claims: {sub: X-User-Id}
"""


def _algorithms(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "must be a non-empty list, e.g. [ES256]")
    result: list[str] = []
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if isinstance(item, str) and item.lower() == "none":
            raise ConfigError(where, "'none' is never accepted: tokens must be signed")
        if item not in ALGORITHMS:
            raise ConfigError(
                where, f"unknown algorithm {item!r}; use {', '.join(sorted(ALGORITHMS))}"
            )
        result.append(str(item))
    if set(result) & HMAC_ALGORITHMS and set(result) - HMAC_ALGORITHMS:
        raise ConfigError(path, "HMAC (HS*) and public-key algorithms cannot be mixed")
    return tuple(result)


def _url(value: object, path: str) -> str:
    url = as_str(value, path)
    if not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(path, "must be an http(s) URL")
    return url


def _forward_claims(r: Reader, raw: object, path: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict):
        r.error(path, "must be a mapping of claim to header name")
        return ()
    forwarded = []
    for claim, header in raw.items():
        if not check_name(r, header, f"{path}.{claim}", OWNED_REQUEST):
            continue
        if str(header).lower().replace("_", "-") == "authorization":
            # the client's copy of a forwarded name is dropped before the token is read: this
            # route would answer every request 401
            r.error(
                f"{path}.{claim}",
                "Authorization carries the token this stage checks: forward the claim under "
                "another name",
            )
            continue
        forwarded.append((str(claim), str(header)))
    return tuple(forwarded)


_FIELDS: Final = Fields(
    JwtConfig,
    {
        "algorithms": _algorithms,
        "issuer": as_str,
        "audiences": str_list,
        "jwks_url": _url,
        "secret": as_str,
        "leeway": parse_duration,
        "required_claims": str_list,
        "forward_claims": Nested(_forward_claims),
        "jwks_refresh": positive_duration,
        "cache_size": positive_int,
    },
    required=("algorithms",),
    # read with its file's content, which must hold a key usable for the algorithms
    extra=("jwks_file",),
)


def parse(r: Reader, raw: object, path: str) -> JwtConfig | None:
    m = _FIELDS.mapping(r, raw, path)
    if m is None:
        return None
    errors = len(r.errors)
    values = _FIELDS.values(r, m, path, algorithms=("RS256",))
    algorithms: tuple[str, ...] = values["algorithms"]
    sources = [k for k in ("jwks_file", "jwks_url", "secret") if m.get(k) is not None]
    if len(sources) != 1:
        r.error(path, "needs exactly one key source: jwks_file, jwks_url or secret")
    hmac_only = set(algorithms) <= HMAC_ALGORITHMS
    if sources == ["secret"] and not hmac_only:
        r.error(f"{path}.algorithms", "a secret verifies HMAC algorithms (HS*) only")
    if sources and sources[0] != "secret" and hmac_only:
        r.error(f"{path}.algorithms", "HS* algorithms need a secret, not public keys")
    if values["secret"] is not None:
        try:
            hmac_key(values["secret"], algorithms)
        except JwksProblem as exc:
            r.error(f"{path}.secret", str(exc))
    if m.get("jwks_file") is not None:
        where = f"{path}.jwks_file"
        found = r.resolve_file(m["jwks_file"], where)
        if found is not None:
            values["jwks_file"] = str(found)
            content = found.read_bytes()
            values["jwks_digest"] = hashlib.sha256(content).hexdigest()
            try:
                # unusable keys are skipped (the stage logs and counts them); none left is an error
                keyset = read_jwks(content)
                if not keyset.usable_for(algorithms):
                    r.error(where, keyset.no_key_problem(algorithms))
            except JwksProblem as exc:
                r.error(where, str(exc))
    return _FIELDS.create(r, values, path, errors)


def _family(config: JwtConfig) -> str:
    return "hmac" if set(config.algorithms) <= HMAC_ALGORITHMS else "public"


def _check(check: PipelineCheck, config: JwtConfig) -> JwtConfig:
    earlier = {_family(s.config) for s in check.before if isinstance(s.config, JwtConfig)}
    # reported once per route: at the first jwt stage of the other family
    if earlier == {"hmac", "public"} - {_family(config)}:
        check.error("HMAC and public-key JWT algorithms cannot share a route", check.pipeline_path)
    return config


def _forwarded_headers(config: JwtConfig) -> tuple[str, ...]:
    return tuple(header for _, header in config.forward_claims)


#: a token without exp is remembered this long at most
_NO_EXP_TTL: Final = 60.0
#: unknown key ids trigger a JWKS fetch at most this often
_MIN_REFETCH: Final = 10.0
#: while there are no keys at all, requests trigger a fetch at most this often (a JWKS endpoint
#: that fails fast must not be fetched in a loop for as long as requests keep coming)
_EMPTY_REFETCH: Final = 1.0
#: how long a request waits for a JWKS fetch it needs
_FETCH_WAIT: Final = 2.0
_CHALLENGE: Final = 'Bearer realm="gateway"'
#: how many of a token's last characters find it in the cache: its signature's, which no two
#: tokens share by chance
_CACHE_KEY_CHARS: Final = 24


def _cache_key(token: str) -> str:
    """What a verified token is cached by: its end, so that a cached request hashes a few
    characters rather than the whole token (the edge scenario's ~290-character ES256 token
    cost ~0.8k instructions to hash on every request, callgrind; an RS256 token is twice as
    long)."""
    return token[-_CACHE_KEY_CHARS:]


def shown_url(url: str) -> str:
    """A URL as logs may show it: no user, password or query (they may hold credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "…" if parts.query else "", ""))


def _count_skipped(skipped: tuple[SkippedKey, ...], counter: Counter) -> None:
    for key in skipped:
        counter.labels(key.reason).inc()


def _log_skipped(source: str, skipped: tuple[SkippedKey, ...]) -> None:
    for key in skipped:
        # kid, reason and our own words (SkippedKey.__str__): never the key's members
        log.warning("JWKS %s: skipped %s", source, key)


def _usable(keyset: KeySet, algorithms: frozenset[str]) -> tuple[VerifyingKey, ...]:
    keys = keyset.usable_for(algorithms)
    if not keys:
        raise JwksProblem(keyset.no_key_problem(algorithms))
    return keys


def _keys_from_file(path: str, algorithms: frozenset[str], skipped: Counter) -> list[VerifyingKey]:
    with open(path, "rb") as f:
        keyset = read_jwks(f.read())
    _log_skipped(path, keyset.skipped)
    _count_skipped(keyset.skipped, skipped)
    return list(_usable(keyset, algorithms))


class JwksFetcher:
    """Keys from a JWKS URL, refreshed in the background."""

    def __init__(
        self,
        url: str,
        refresh: float,
        algorithms: frozenset[str],
        skipped: Counter,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.url = url
        self.refresh = refresh
        self.keys: list[VerifyingKey] = []
        self.last_error: str | None = None
        self._algorithms = algorithms
        self._skipped = skipped
        #: what the last set read skipped, so an unchanged set is not logged at every refresh
        self._skipped_before: tuple[SkippedKey, ...] = ()
        self._loop = loop
        #: when a token last made us fetch for an unknown key id (bounded, against floods of
        #: made-up key ids)
        self._kid_fetch_at = -_MIN_REFETCH
        self._empty_fetch_at = -_EMPTY_REFETCH
        #: the URL as logs show it (shown_url)
        self._shown = shown_url(url)
        self._pending: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = loop.create_task(self._run())

    def _fetching(self) -> asyncio.Task[None]:
        """The fetch in flight, or a new one: the refresh loop and requests share it, so there
        is never more than one at a time."""
        if self._pending is None or self._pending.done():
            self._pending = self._loop.create_task(self.fetch())
        return self._pending

    async def _run(self) -> None:
        while True:
            await asyncio.shield(self._fetching())
            await asyncio.sleep(self.refresh)

    async def fetch(self) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=5)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(self.url) as response,
            ):
                if response.status != 200:
                    raise JwksProblem(f"status {response.status}")
                keyset = read_jwks(await response.read())
            self._report(keyset.skipped)
            keys = _usable(keyset, self._algorithms)
        except (aiohttp.ClientError, TimeoutError, JwksProblem) as exc:
            # keep the keys we had: a JWKS endpoint down must not log everyone out
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("JWKS fetch from %s failed: %s", self._shown, self.last_error)
            return
        self.keys = list(keys)
        self.last_error = None

    def _report(self, skipped: tuple[SkippedKey, ...]) -> None:
        _count_skipped(skipped, self._skipped)
        if skipped != self._skipped_before:
            _log_skipped(self._shown, skipped)
            self._skipped_before = skipped

    async def current(self, *, unknown_kid: bool = False) -> list[VerifyingKey]:
        """The keys; fetched now when there are none yet, or a token named an unknown key."""
        now = self._loop.time()
        if not self.keys:
            pending = self._pending
            # wait for a fetch in flight; start one at most every _EMPTY_REFETCH
            due = (pending is not None and not pending.done()) or (
                now - self._empty_fetch_at >= _EMPTY_REFETCH
            )
            if due:
                self._empty_fetch_at = now
        else:
            due = unknown_kid and now - self._kid_fetch_at >= _MIN_REFETCH
            if due:
                self._kid_fetch_at = now
        if due:
            with contextlib.suppress(TimeoutError):
                # a request's driven coroutine is not a task, which Python 3.12's wait_for needs
                await into_task()
                await asyncio.wait_for(asyncio.shield(self._fetching()), _FETCH_WAIT)
        return self.keys

    def retire(self) -> None:
        """Stop refreshing.  A fetch in flight is left to end (within its 5 s timeout): requests
        that began before a reload replaced the stage may be waiting for it, and cancelling it
        would cancel them."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def close(self) -> None:
        """Stop everything, the fetch in flight too (at shutdown: no request waits any more)."""
        self.retire()
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()


@final
class JwtStage:
    __slots__ = (
        "_cache",
        "_cache_size",
        "_counters",
        "_fetcher",
        "_forward",
        "_forward_names",
        "_keys",
        "_policy",
        "_total",
    )

    def __init__(
        self,
        config: JwtConfig,
        total: Counter,
        skipped: Counter,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        algorithms = frozenset(config.algorithms)
        self._policy = Policy(
            issuer=config.issuer,
            audiences=config.audiences,
            algorithms=algorithms,
            leeway=config.leeway,
            required_claims=config.required_claims,
        )
        self._keys: list[VerifyingKey] = []
        self._fetcher: JwksFetcher | None = None
        if config.secret is not None:
            self._keys = [hmac_key(config.secret, algorithms)]
        elif config.jwks_file is not None:
            self._keys = _keys_from_file(config.jwks_file, algorithms, skipped)
        elif config.jwks_url is not None:
            self._fetcher = JwksFetcher(
                config.jwks_url, config.jwks_refresh, algorithms, skipped, loop
            )
        self._forward = [(c, h.encode("latin-1")) for c, h in config.forward_claims]
        self._forward_names = frozenset(
            h.lower().replace("_", "-").encode("latin-1") for _, h in config.forward_claims
        )
        #: verified tokens by `_cache_key`: (claims, until when they hold, the whole token)
        self._cache: OrderedDict[str, tuple[dict[str, Any], float, str]] = OrderedDict()
        self._cache_size = config.cache_size
        self._total = total
        #: route -> result -> its child of gateway_jwt_total (keyed by the strings themselves,
        #: whose hashes are cached, so counting builds no tuple per request)
        self._counters: dict[str, dict[str, CounterChild]] = {}

    def _count(self, route: str, result: str) -> None:
        by_result = self._counters.get(route)
        if by_result is None:
            by_result = self._counters[route] = {}
        child = by_result.get(result)
        if child is None:
            child = by_result[result] = self._total.labels(route, result)
        child.inc()

    def _cached(self, token: str, now: float) -> dict[str, Any] | None:
        """The claims of a token verified before and not expired since, or None.

        Synchronous, so that a cached token (nearly every request) costs a dict lookup and no
        coroutine; only a miss goes on to `_verified`, which may wait for keys.
        """
        # Found by its last characters (`_cache_key`), then compared whole: a token that only
        # ends like a cached one is a miss and is verified like any other, and the one cached
        # stays.  The whole token must match because `verify` refuses every spelling but the
        # canonical one (is_compact_jws) and only what it accepted is stored, so a misspelled
        # token cannot be taken for a cached one and goes on to be refused below.  Checking the
        # spelling first instead would give the same answers and cost a cached request more
        # than the lookup itself.
        key = _cache_key(token)
        cached = self._cache.get(key)
        if cached is None:
            return None
        claims, until, whole = cached
        if whole != token:
            return None
        if now < until:
            self._cache.move_to_end(key)
            return claims
        del self._cache[key]
        return None

    async def _verified(self, token: str, now: float) -> dict[str, Any]:
        """The claims of a token not in the cache, checked by `verify` (pyjwt's signature
        check), and remembered until its exp."""
        fetcher = self._fetcher
        keys = self._keys if fetcher is None else await fetcher.current()
        try:
            claims = verify(token, keys, self._policy, now)
        except TokenRejected as exc:
            if fetcher is None or exc.reason != "unknown key id":
                raise
            # a key we have not seen: the issuer may have rotated its keys
            keys = await fetcher.current(unknown_kid=True)
            claims = verify(token, keys, self._policy, now)
        exp = claims.get("exp")
        until = float(exp) if isinstance(exp, int | float) else now + _NO_EXP_TTL
        self._cache[_cache_key(token)] = (claims, min(until, now + 3600.0), token)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return claims

    def __call__(self, ctx: RequestContext, call_next: Next) -> Awaitable[Response]:
        """The rest of the pipeline's awaitable once the request is authenticated.

        Not a coroutine: a cached token (nearly every request) is settled here, synchronously,
        and the request goes on as the next stage's own awaitable, with no frame of ours left
        around it (there is nothing to do on the way back).  Only a token to verify gets a
        coroutine, `_verify_then`, since finding its keys may wait.  A refusal raises here, at
        the call; every caller calls and awaits in one expression (`await call_next(ctx)`), so
        it is caught where a raise from the await would be.
        """
        head = ctx.head
        if self._forward_names:
            drop = self._forward_names
            # "_" read as "-": X_User_Id is X-User-Id to a CGI/WSGI upstream, whatever the
            # route's underscores_in_headers says
            headers = head.headers
            kept = [(n, v) for n, v in headers if n.lower().replace(b"_", b"-") not in drop]
            if len(kept) != len(headers):
                # the list changed: what the head derives from it is derived again
                head.replace_headers(kept)
        # kept by the connection as received (a second copy was refused); stripped as
        # get_header strips it: "k" and "k " are one value
        raw = head.authorization
        authorization = None if raw is None else raw.decode("latin-1").strip(" \t")
        route = ctx.route.name
        # not bearer_token: its pass over the characters would cost a cached request more than
        # the lookup; `verify` holds a token to canonical base64url, stricter than token68
        token = bearer_credentials(authorization)
        if token is None and (authorization is None or not names_bearer(authorization)):
            self._count(route, "missing")
            ctx.outcome("jwt", "missing")
            raise Unauthenticated(
                "a bearer token is required", headers=[("WWW-Authenticate", _CHALLENGE)]
            )
        if token is None:  # "Bearer" with garbled credentials
            raise self._refused(ctx, route, TokenRejected("malformed token")) from None
        # exp and nbf are wall-clock times (time.time, imported by name: compiled code reads a
        # global faster than a module's attribute)
        now = wall_clock()
        claims = self._cached(token, now)
        if claims is None:
            return self._verify_then(ctx, call_next, route, token, now)
        self._admit(ctx, route, claims)
        return call_next(ctx)

    async def _verify_then(
        self, ctx: RequestContext, call_next: Next, route: str, token: str, now: float
    ) -> Response:
        """The pipeline for a token that was not in the cache: verified first."""
        try:
            claims = await self._verified(token, now)
        except TokenRejected as exc:
            raise self._refused(ctx, route, exc) from None
        self._admit(ctx, route, claims)
        return await call_next(ctx)

    def _refused(self, ctx: RequestContext, route: str, exc: TokenRejected) -> Unauthenticated:
        """The 401 for a token that does not authenticate, counted."""
        result = "expired" if exc.expired else "invalid"
        self._count(route, result)
        ctx.outcome("jwt", result)
        challenge = f'{_CHALLENGE}, error="invalid_token", error_description="{exc.reason}"'
        return Unauthenticated(exc.reason, headers=[("WWW-Authenticate", challenge)])

    def _admit(self, ctx: RequestContext, route: str, claims: dict[str, Any]) -> None:
        """An authenticated request: counted, its claims in the context and forwarded."""
        self._count(route, "ok")
        ctx.claims = claims
        for claim, header in self._forward:
            value = claims.get(claim)
            if value is None:
                continue
            text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
            if not text.isprintable() or not text.isascii():
                continue  # never forward a value that could break the header block
            ctx.add_upstream_header(header, text.encode("ascii"))

    async def warm(self, limit: float) -> None:
        """Wait (at most `limit` seconds) for a JWKS URL's first keys; best effort."""
        if self._fetcher is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._fetcher.current(), limit)

    @property
    def jwks_error(self) -> str | None:
        """Why the last JWKS fetch was not taken (None when it was, or keys are not fetched)."""
        return None if self._fetcher is None else self._fetcher.last_error

    def retire(self) -> None:
        """A reload replaced this stage: stop refreshing keys, without failing the requests
        still running through it (see JwksFetcher.retire)."""
        if self._fetcher is not None:
            self._fetcher.retire()

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close()


def build(config: JwtConfig, spec: StageSpec, env: BuildContext) -> JwtStage:
    metrics = env.metrics
    return JwtStage(config, metrics.jwt_total, metrics.jwt_keys_skipped_total, env.loop)


KIND: Final[StageKind[JwtConfig, JwtStage]] = StageKind(
    name="jwt",
    parse=parse,
    build=build,
    example=EXAMPLE,
    check=_check,
    upstream_headers=_forwarded_headers,
    retire=JwtStage.retire,
    close=JwtStage.close,
    warm=JwtStage.warm,
)
