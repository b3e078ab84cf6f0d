"""The `idempotency` stage (SPEC §5.5): a repeated request is answered, not executed again.

For the configured methods, the key header is required (400 `idempotency_key_missing`) and
checked: a signed token bound to the client when `token:` is set, else an opaque 1-255 visible
ASCII characters (400 `idempotency_key_invalid`).  Records belong to a client, by `scope`
(resolved by the loader: by default the subject of an earlier jwt stage, else the SANs of an
earlier mtls stage, else the consumer of an earlier api_key or basic_auth stage, else none):
a key names a record only together with the scope's value and the token's client id, so one
client can neither replay nor probe (422) another's.  A request lacking its scope value is
refused (400 `idempotency_key_invalid`) rather than sharing an empty scope with every other such
request.  The request's fingerprint — method, path, query and a
digest of its body (buffered, within the route's body limit) — goes with the record's key into
the store's `begin`, one atomic step:
- first use: the lock is ours; the upstream's response, whatever its status, is stored as it
  streams to the client (`_Recorder`), and completes the record when its body ends;
- the first request still running: 409 `idempotency_key_in_use` with `Retry-After`;
- its outcome unknown: 409 `idempotency_outcome_unknown`, for the whole `ttl`;
- the same key for a different request: 422 `idempotency_key_reused`;
- completed: the stored status, headers and body, with `Idempotent-Replayed: true` (409 while
  the first response's body is still streaming).
Without a complete answer (SPEC §5.5): if nothing of the request was ever written to an
upstream (`ctx.tries.written` is 0: a connect error, a full pool, a later stage's refusal, a
client gone before), the key is released; once any try was written — a timeout, a reset, a
closed connection, a truncated or garbled response, the client gone — the upstream may have
run it, so the outcome is kept as unknown for the `ttl` and no repeat runs it again.  With
`upstream_deduplicates: true` the upstream honours the forwarded key itself: the key is
released instead, and a later `retry` stage may re-send a written try (`ctx.tries.resend_keyed`).  A
response over `max_response_bytes` completes the record without its body: duplicates get 409
for the whole `ttl` rather than a second execution.
The store keeps the stage's records within `max_keys` and `max_bytes` by evicting completed
ones (counted); a new key it cannot admit because only locks are left is a store failure,
answered by `on_store_error` (503 `store_unavailable` by default).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from dataclasses import dataclass, replace
from typing import Final, Literal, final

from gateway.config.model import StageSpec
from gateway.config.reader import (
    Fields,
    Nested,
    Reader,
    as_bool,
    as_str,
    choice,
    positive_duration,
    positive_int,
    positive_size,
)
from gateway.config.stages import PipelineCheck
from gateway.core.idempotency_tokens import TokenInvalid, verify_token
from gateway.errors import (
    ConfigError,
    GatewayError,
    IdempotencyKeyInUse,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    IdempotencyOutcomeUnknown,
    StoreUnavailable,
)
from gateway.http.messages import BodySink, BodyStream, Response
from gateway.identity import Part, identity_part
from gateway.observability.instruments import Counter
from gateway.observability.metrics import GatewayMetrics
from gateway.pipeline import Next, RequestContext
from gateway.stages.converters import (
    CONSUMER_KINDS,
    TOKEN,
    check_identity_key,
    client_id,
    store_name,
)
from gateway.stages.kind import BuildContext, StageKind
from gateway.stores.base import (
    IN_USE,
    REPLAY,
    REUSED,
    UNKNOWN,
    IdempotencyRecords,
    RecordsMeter,
    Store,
    StoredResponse,
    StoreError,
)

log = logging.getLogger("gateway.idempotency")


@dataclass(frozen=True, slots=True, kw_only=True)
class IdempotencyTokenConfig:
    secret: str
    #: a token is valid this many seconds either side of its minting time
    window: float = 300.0
    #: whose token it is: "jwt:<claim>", "mtls:san", "consumer" or "header:<name>"
    client_id: str

    def __repr__(self) -> str:
        # the secret must never reach a log line or an error message
        return f"IdempotencyTokenConfig(secret=***, client_id={self.client_id!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class IdempotencyConfig:
    header: str = "Idempotency-Key"
    methods: tuple[str, ...] = ("POST", "PATCH")
    required: bool = True
    ttl: float = 86400.0
    store: str = "memory"
    on_store_error: Literal["allow", "deny"] = "deny"
    max_response_bytes: int = 1024 * 1024
    #: records kept per stage (per worker with the memory store), in-flight locks included
    max_keys: int = 100_000
    #: bytes of keys and stored responses kept per stage: 64 responses of the largest size
    #: kept, or 100000 of ~670 bytes; beyond it completed records are evicted oldest first
    max_bytes: int = 64 * 1024 * 1024
    #: whose records these are: "none" (the key alone), "client_ip", "header:<lower-case
    #: name>", "jwt:<claim>", "mtls:san" or "consumer"; "auto" as written, which the loader
    #: resolves per route to "jwt:sub" after a jwt stage, else "mtls:san" after an mtls stage,
    #: else "consumer" after an api_key or basic_auth stage, else "none"
    scope: str = "auto"
    token: IdempotencyTokenConfig | None = None
    #: the upstream honours the forwarded key itself: a request whose outcome is unknown may
    #: be sent again (its key is released, and a later retry stage may re-send it)
    upstream_deduplicates: bool = False


EXAMPLE: Final = """\
methods: [POST, PATCH]
ttl: 24h
max_response_bytes: 1MiB
scope: auto
"""


def _header_name(value: object, path: str) -> str:
    header = as_str(value, path)
    if not TOKEN.match(header):
        raise ConfigError(path, "must be a header name")
    return header


def _methods(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
        raise ConfigError(path, "must be a non-empty list of methods")
    return tuple(str(x).upper() for x in value)


def _token_secret(value: object, path: str) -> str:
    secret = as_str(value, path)
    if len(secret.encode()) < 32:
        raise ConfigError(path, "must be at least 32 bytes (use ${ENV})")
    return secret


#: idempotency scopes, the ones with a value after the colon listed with it
_SCOPES: Final = (
    "auto",
    "none",
    "client_ip",
    "header:NAME",
    "jwt:CLAIM",
    "consumer",
    "mtls:san",
)


def _scope(value: object, path: str) -> str:
    if value in ("auto", "none", "client_ip"):
        return str(value)
    try:
        return client_id(value, path)
    except ConfigError:
        raise ConfigError(path, f"must be {', '.join(_SCOPES[:-1])} or {_SCOPES[-1]}") from None


def _check_sizes(r: Reader, config: IdempotencyConfig, path: str) -> None:
    if config.max_bytes < config.max_response_bytes:
        r.error(
            f"{path}.max_bytes",
            f"must be at least max_response_bytes ({config.max_response_bytes}), or responses"
            " that size could never be kept",
        )


_TOKEN_FIELDS: Final = Fields(
    IdempotencyTokenConfig,
    {"secret": _token_secret, "window": positive_duration, "client_id": client_id},
    required=("secret", "client_id"),
)
_FIELDS: Final = Fields(
    IdempotencyConfig,
    {
        "header": _header_name,
        "methods": _methods,
        "required": as_bool,
        "ttl": positive_duration,
        "store": store_name,
        "on_store_error": choice("allow", "deny"),
        "max_response_bytes": positive_size,
        "max_keys": positive_int,
        "max_bytes": positive_size,
        "scope": _scope,
        "token": Nested(_TOKEN_FIELDS.parse),
        "upstream_deduplicates": as_bool,
    },
    check=_check_sizes,
)


def _check(check: PipelineCheck, config: IdempotencyConfig) -> IdempotencyConfig:
    """After any authentication, keyed on what it authenticated; `scope: auto` resolved to the
    client an earlier stage authenticated — a JWT's subject, else a certificate's SANs, else an
    api_key or basic_auth consumer — or, with none, the key alone."""
    authenticating = ("jwt", "mtls", *CONSUMER_KINDS)
    later = [(path, spec.kind) for path, spec in check.after if spec.kind in authenticating]
    if later:
        where, kind = later[0]
        check.error(
            f"idempotency must come after the {kind} stage ({where}): a replayed answer"
            " would skip authentication, and records could not belong to the client"
        )
    if config.token is not None:
        check_identity_key(check, config.token.client_id, "token client_id")
    check_identity_key(check, config.scope, "idempotency scope")
    if config.scope != "auto":
        return config
    before = check.kinds_before
    scope = (
        "jwt:sub"
        if "jwt" in before
        else "mtls:san"
        if "mtls" in before
        else "consumer"
        if before & set(CONSUMER_KINDS)
        else "none"
    )
    clash = check.resolve_once("scope", scope)
    if clash is not None:
        first, where = clash
        name = check.spec.owner.removeprefix("middleware:")
        check.error(
            f"middleware {name!r} has scope: auto, which is {first} in {where} but {scope}"
            " here (one instance serves both): set its scope"
        )
    return replace(config, scope=scope)


_REPLAYED: Final = (b"Idempotent-Replayed", b"true")
#: how much longer than the route's timeout an in-flight lock lasts (the body may still stream)
_LOCK_MARGIN: Final = 30.0


def _opaque_key_ok(key: str) -> bool:
    return 1 <= len(key) <= 255 and all("!" <= c <= "~" for c in key)


def length_prefixed(*parts: str) -> str:
    """`parts` as one string no other parts give: each written as <length>:<text>."""
    return "".join([f"{len(part)}:{part}" for part in parts])


def record_key(scope_prefix: str, scope: str, client: str, key: str) -> str:
    """A record's key: `scope_prefix` (the scope's kind, length-prefixed) then the scope's
    value, the token's client id and the key as `length_prefixed` writes them — spelled out,
    since a call per keyed request with varargs costs twice as much."""
    return f"{scope_prefix}{len(scope)}:{scope}{len(client)}:{client}{len(key)}:{key}"


def _certificate_scope(ctx: RequestContext) -> str | None:
    sans = ctx.peer.client_sans
    # each SAN length-prefixed, not comma-joined: a URI SAN may hold a comma, and two
    # certificates must never share a scope
    return length_prefixed(*sans) if sans else None


def _scope_part(scope: str) -> Part | None:
    """What reads a request's scope value; None for `none`."""
    if scope == "none":
        return None
    if scope == "auto":
        raise AssertionError("scope: auto is resolved by the loader")
    return _certificate_scope if scope == "mtls:san" else identity_part(scope)


def _scope_source(scope: str) -> str:
    """Where a scope comes from, as the 400 for a request without it says."""
    kind, _, name = scope.partition(":")
    if kind == "header":
        return f"the {name} header"
    if kind == "jwt":
        return f"the {name} claim of its token"
    if kind == "mtls":
        return "the SANs of its client certificate"
    if kind == "consumer":
        return "the consumer its api_key or basic_auth stage authenticated"
    return "the client's address"


@final
class _Recorder:
    """Streams a response body to the client and keeps a copy for the record."""

    __slots__ = ("_cap", "_chunks", "_inner", "_on_end", "_sink", "_size", "length")

    def __init__(
        self, inner: BodyStream, cap: int, on_end: asyncio.Future[bytes | None] | None
    ) -> None:
        self._inner = inner
        self.length = inner.length
        self._cap = cap
        self._chunks: list[bytes] | None = (
            [] if inner.length is None or inner.length <= cap else None
        )
        self._size = 0
        self._sink: BodySink | None = None
        self._on_end = on_end

    def pipe(self, sink: BodySink) -> asyncio.Future[None]:
        self._sink = sink
        done = self._inner.pipe(self)
        future = asyncio.ensure_future(done)
        future.add_done_callback(self._ended)
        return future

    def write(self, data: bytes) -> None:
        assert self._sink is not None
        self._sink.write(data)
        chunks = self._chunks
        if chunks is not None:
            self._size += len(data)
            if self._size > self._cap:
                self._chunks = None  # too large to keep: stream on, store the head only
            else:
                chunks.append(data)

    def _ended(self, future: asyncio.Future[None]) -> None:
        waiter = self._on_end
        if waiter is None or waiter.done():
            return
        if future.cancelled() or future.exception() is not None:
            waiter.set_exception(ConnectionError("the response body did not arrive whole"))
        else:
            waiter.set_result(b"".join(self._chunks) if self._chunks is not None else None)

    def pause(self) -> None:
        self._inner.pause()

    def resume(self) -> None:
        self._inner.resume()

    def progressing(self) -> None:
        self._inner.progressing()

    def abort(self) -> None:
        self._inner.abort()
        waiter = self._on_end
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError("the client went away"))

    def release_unused(self) -> None:
        # no body is sent, so none can be recorded: the record fails as when the client leaves
        self.abort()


@final
class IdempotencyStage:
    __slots__ = (
        "_config",
        "_header",
        "_loop",
        "_methods",
        "_records",
        "_scope_missing",
        "_scope_part",
        "_scope_prefix",
        "_signed",
        "_total",
    )

    def __init__(
        self,
        config: IdempotencyConfig,
        label: str,
        namespace: str,
        store: Store,
        metrics: GatewayMetrics,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._config = config
        self._header = config.header.lower()
        self._methods = frozenset(config.methods)
        token = config.token
        #: with `token:`, its settings and where the client id it is bound to comes from
        self._signed: tuple[IdempotencyTokenConfig, Part] | None = (
            None if token is None else (token, identity_part(token.client_id))
        )
        #: None for `scope: none` (the key alone)
        self._scope_part = _scope_part(config.scope)
        #: records written under another scope (before a reload) never match
        self._scope_prefix = length_prefixed(config.scope)
        self._scope_missing = (
            f"this route keeps idempotency keys per client, by {_scope_source(config.scope)},"
            " and the request has none"
        )
        meter = RecordsMeter(
            metrics.idempotency_records.labels(label),
            metrics.idempotency_records_bytes.labels(label),
            metrics.idempotency_evictions_total.labels(label),
        )
        self._records: IdempotencyRecords = store.idempotency(
            namespace=namespace, max_keys=config.max_keys, max_bytes=config.max_bytes, meter=meter
        )
        self._total: Counter = metrics.idempotency_total
        self._loop = loop

    def _count(self, ctx: RequestContext, outcome: str) -> None:
        ctx.outcome("idempotency", outcome)
        self._total.labels(ctx.route.name, outcome).inc()

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Response:
        head = ctx.head
        if head.method not in self._methods:
            return await call_next(ctx)
        config = self._config
        # a second copy is refused: the upstream (upstream_deduplicates) could read the other
        key = head.get_single_header(self._header)
        if key is None:
            if config.required:
                self._count(ctx, "missing")
                raise IdempotencyKeyMissing(f"this request needs an {config.header} header")
            return await call_next(ctx)
        scoped = self._scoped_key(ctx, key)
        fingerprint = await self._fingerprint(ctx)
        lock_ttl = ctx.route.timeout + _LOCK_MARGIN
        try:
            begin = await self._records.begin(scoped, fingerprint, lock_ttl)
        except StoreError as exc:
            log.warning("idempotency store failed: %s", exc)
            if config.on_store_error == "deny":
                self._count(ctx, "store_error")
                raise StoreUnavailable("the idempotency store is unavailable") from None
            self._count(ctx, "store_error")
            return await call_next(ctx)
        if begin.outcome == REUSED:
            self._count(ctx, "reused")
            raise IdempotencyKeyReused("this key was used for a different request")
        if begin.outcome == IN_USE:
            self._count(ctx, "in_use")
            raise IdempotencyKeyInUse(
                "a request with this key is still being processed",
                headers=[("Retry-After", str(max(1, math.ceil(begin.retry_after))))],
            )
        if begin.outcome == UNKNOWN:
            self._count(ctx, "unknown")
            raise IdempotencyOutcomeUnknown(
                "a request with this key reached the upstream and no complete answer came back:"
                " it may have run, and will not run again for this key (reconcile, then use a"
                " new key)"
            )
        if begin.outcome == REPLAY:
            stored = begin.response
            assert stored is not None
            if stored.pending:
                self._count(ctx, "in_use")
                raise IdempotencyKeyInUse(
                    "the response to a request with this key is still being sent",
                    headers=[("Retry-After", "1")],
                )
            if not stored.replayable:
                self._count(ctx, "in_use")
                raise IdempotencyKeyInUse(
                    "a request with this key completed; its response was too large to keep",
                    headers=[("Retry-After", str(int(config.ttl)))],
                )
            self._count(ctx, "replayed")
            return Response(stored.status, [*stored.headers, _REPLAYED], stored.body)
        self._count(ctx, "new")
        # a later retry stage may re-send a written request only if the upstream itself
        # de-duplicates by this key (SPEC §5.6); an unwritten try is always safe to repeat
        ctx.tries.resend_keyed = config.upstream_deduplicates
        return await self._first(ctx, call_next, scoped, fingerprint)

    def _scoped_key(self, ctx: RequestContext, key: str) -> str:
        """The record's key, or a 400 for a key that is not valid here or a request that lacks
        its scope: the scope's kind and value, the token's client id and the key, each
        length-prefixed, so no two different combinations can share a record."""
        client = ""
        signed = self._signed
        if signed is not None:
            token, token_client = signed
            found = token_client(ctx)
            if found is None:
                # never the empty client id: a token minted for "" would pass for every client
                # that lacks one
                self._count(ctx, "invalid")
                raise IdempotencyKeyInvalid(
                    f"the signed key is bound to {_scope_source(token.client_id)},"
                    " and the request has none"
                )
            client = found
            try:
                verify_token(key, token.secret, client, window=token.window)
            except TokenInvalid as exc:
                self._count(ctx, "invalid")
                raise IdempotencyKeyInvalid(exc.reason) from None
        elif not _opaque_key_ok(key):
            self._count(ctx, "invalid")
            raise IdempotencyKeyInvalid("a key is 1-255 visible ASCII characters")
        scope = ""
        scope_part = self._scope_part
        if scope_part is not None:
            value = scope_part(ctx)
            if value is None:
                # never the empty scope: every client without one would share it
                self._count(ctx, "invalid")
                raise IdempotencyKeyInvalid(self._scope_missing)
            scope = value
        return record_key(self._scope_prefix, scope, client, key)

    async def _fingerprint(self, ctx: RequestContext) -> str:
        head = ctx.head
        digest = hashlib.sha256()
        body = ctx.body
        if body is not None:
            limit = ctx.route.max_body_bytes
            await body.fill(limit if limit is not None else ctx.snapshot.limits.max_body_bytes)
            digest.update(body.take_all())
        text = f"{head.method}\n{head.path}\n{head.query}\n{digest.hexdigest()}"
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()

    async def _first(
        self, ctx: RequestContext, call_next: Next, scoped: str, fingerprint: str
    ) -> Response:
        records = self._records
        try:
            response = await call_next(ctx)
        except GatewayError:
            # no answer from the upstream (the gateway's own 502/503/504, a later stage's
            # refusal): unknown if any try was written, else the key is free again
            await self._unanswered(ctx, scoped, fingerprint)
            raise
        except BaseException:
            # the client left (or a bug): the same rule, without awaiting in a cancelled task
            task = self._loop.create_task(self._unanswered(ctx, scoped, fingerprint))
            task.add_done_callback(_log_failure)
            raise
        head = [(n, v) for n, v in response.headers]
        stream = response.stream
        if stream is None:
            body = response.body
            too_large = len(body) > self._config.max_response_bytes
            await records.complete(
                scoped,
                StoredResponse(
                    response.status, head, b"" if too_large else body, replayable=not too_large
                ),
                self._config.ttl,
            )
            return response
        # the upstream has answered: from now on the request must never run again, however long
        # its body takes to stream (the in-flight lock would expire with the route's timeout)
        await records.complete(
            scoped, StoredResponse(response.status, head, b"", pending=True), self._config.ttl
        )
        ended: asyncio.Future[bytes | None] = self._loop.create_future()
        response.stream = _Recorder(stream, self._config.max_response_bytes, ended)
        ended.add_done_callback(
            lambda f: self._stored(f, scoped, fingerprint, response.status, head)
        )
        return response

    async def _unanswered(self, ctx: RequestContext, scoped: str, fingerprint: str) -> None:
        """No complete answer came back.  Never written anywhere: the key is released.  Written
        (any byte may have reached an upstream): the outcome is unknown — kept as such for the
        `ttl`, so no repeat runs it twice — unless the upstream de-duplicates by the key itself,
        when the client may simply send it again."""
        if ctx.tries.written and not self._config.upstream_deduplicates:
            ctx.outcome("idempotency", "unknown")
            await self._records.mark_unknown(scoped, fingerprint, self._config.ttl)
        else:
            await self._records.release(scoped)

    def _stored(
        self,
        ended: asyncio.Future[bytes | None],
        scoped: str,
        fingerprint: str,
        status: int,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        if ended.cancelled() or ended.exception() is not None:
            # the body broke off: the client got no complete answer, so it cannot know what ran
            # (SPEC §5.5: a truncated response leaves the outcome unknown) — unless the
            # upstream de-duplicates by the key, when the client may simply send it again
            records = self._records
            task = self._loop.create_task(
                records.release(scoped)
                if self._config.upstream_deduplicates
                else records.mark_unknown(scoped, fingerprint, self._config.ttl)
            )
        else:
            body = ended.result()
            stored = StoredResponse(status, headers, body or b"", replayable=body is not None)
            task = self._loop.create_task(
                self._records.complete(scoped, stored, self._config.ttl)
            )
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("storing an idempotent response failed: %s", task.exception())


def build(config: IdempotencyConfig, spec: StageSpec, env: BuildContext) -> IdempotencyStage:
    store = env.stores[config.store]
    return IdempotencyStage(config, spec.label, spec.owner, store, env.metrics, env.loop)


def _describe(config: IdempotencyConfig) -> dict[str, object]:
    return {"scope": config.scope}


KIND: Final[StageKind[IdempotencyConfig, IdempotencyStage]] = StageKind(
    name="idempotency",
    parse=_FIELDS.parse,
    build=build,
    example=EXAMPLE,
    check=_check,
    describe=_describe,
)
