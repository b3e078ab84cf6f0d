"""The `api_key` stage (SPEC §5.8): a request must present a known API key, or 401.

The key is read from one header (`header`, default X-API-Key) or one query parameter (`query`).
Keys are known only by their sha256 digests, from `keys_file` (YAML: `{consumer: sha256-hex}`,
or a list of digests for a consumer holding several keys while one is rotated), from `keys`
written in the config (where `${ENV}` can supply the digest), or both.  The file is read with
the config, so it is watched like every file the config references: a change is a reload, and an
invalid file is a reload error — the keys in force stay in force, the error is logged with its
YAML path and counted in `gateway_config_reloads_total{result="failure"}`.  The gateway never
holds a plain key beyond the request that presents it: not in the config, not in memory
between requests, not in /admin or a log line.

An accepted key's consumer goes into `ctx.consumer` and upstream as `X-Consumer`; with
`hide_credentials` (default true) the key itself does not: its header is removed, or its query
parameter cut from the query, so it never reaches the upstream or the upstream's logs.  A
refusal is 401 `unauthenticated` with `WWW-Authenticate: ApiKey realm="...", in="header",
name="X-API-Key"` — a scheme of our own naming where the key goes (as OpenAPI's apiKey scheme
does), which no browser answers with a password prompt.  Every decision is counted in
`gateway_stage_total{route,stage="api_key",outcome}` (allowed, missing, invalid) and named in the
access log.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, cast, final
from urllib.parse import unquote, unquote_to_bytes

import yaml

from gateway.config.model import StageSpec
from gateway.config.reader import Fields, Reader, as_bool, as_str
from gateway.config.stages import PipelineCheck
from gateway.config.strict_yaml import load_yaml
from gateway.errors import BadRequest, ConfigError, Unauthenticated
from gateway.http.messages import RequestHead, Response
from gateway.pipeline import Next, RequestContext
from gateway.stages import credentials
from gateway.stages.converters import OWNED_REQUEST, check_name
from gateway.stages.kind import BuildContext, StageKind
from gateway.stages.outcomes import StageOutcomes


def _sha256_of() -> Callable[[bytes], Any]:
    """The cheapest way to hash one short key: CPython's own sha256 (`_sha2` from 3.12, HACL*;
    `_sha256` before), with no OpenSSL context to copy, lock and wipe per key: 283 ns a key
    against 328 ns (timeit, on this machine, where OpenSSL uses the CPU's SHA extensions:
    the context, not the hashing, is what costs).  Where Python was built without it: a copy
    of an empty OpenSSL sha256 (`hashlib.sha256(key)` itself looks the algorithm up in
    OpenSSL 3's providers per call)."""
    for module in ("_sha2", "_sha256"):
        try:
            return cast(Callable[[bytes], Any], importlib.import_module(module).sha256)
        except (ImportError, AttributeError):
            continue
    empty = hashlib.sha256()

    def copied(key: bytes) -> Any:
        digest = empty.copy()
        digest.update(key)
        return digest

    return copied


#: a sha256 object of a key, whose `digest()` is looked up (never the key itself)
_SHA256_OF: Final = _sha256_of()
#: the blanks stripped from a key (space and tab), as byte values
_BLANKS: Final = frozenset(b" \t")
_KIND: Final = "api_key"


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKeyConfig:
    """Where the key is read and whose keys are known (by digest only)."""

    #: the header carrying the key; unused when `query` is set
    header: str = "X-API-Key"
    #: the query parameter carrying the key, instead of a header
    query: str | None = None
    keys_file: str | None = None
    #: (sha256 digest of a key, its consumer), from `keys_file` and `keys`, sorted
    keys: tuple[tuple[bytes, str], ...] = ()
    #: the key is not forwarded upstream (its header removed, its query parameter cut)
    hide_credentials: bool = True
    realm: str = "gateway"

    def __repr__(self) -> str:
        # digests are not keys, but nothing derived from a credential goes into a log line
        where = f"query={self.query!r}" if self.query else f"header={self.header!r}"
        return f"ApiKeyConfig({where}, keys=<{len(self.keys)} digests>)"


EXAMPLE: Final = """\
header: X-API-Key
# each consumer's key as its sha256: printf %s "$KEY" | sha256sum
keys:
  billing-service: ec8d84a6f12aa2e67f75306146f6730c3ab63ae651adaeeeb392d64a63f7ac55
  # several digests while a key is rotated
  reporting: [cba0cb8d5620858af07184884d3de2dd8d6d239dc4244065e94e077b73ba64ba,
              cc5be3c1afedd9a01ebcdff01be96f89921a2bea15744eab999c837949f50eb3]
"""

#: a query parameter name: unreserved URL characters, so it is never percent-encoded
_QUERY_NAME: Final = re.compile(r"^[A-Za-z0-9._~-]{1,64}$")
_DIGEST: Final = re.compile(r"^[0-9a-fA-F]{64}$")


def _query_name(value: object, path: str) -> str:
    name = as_str(value, path)
    if not _QUERY_NAME.match(name):
        raise ConfigError(
            path, "must be a query parameter name (letters, digits, '.', '_', '~' and '-')"
        )
    return name


def _digests(value: object, where: str) -> list[bytes]:
    """A consumer's digests: one, or a list of them (keys being rotated)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(where, "must be a sha256 hex digest or a list of them")
    result = []
    for i, item in enumerate(items):
        # never quote the value: a plain key put here by mistake must not reach a log line
        if not isinstance(item, str) or not _DIGEST.match(item.strip()):
            raise ConfigError(
                f"{where}[{i}]" if isinstance(value, list) else where,
                "must be the key's sha256 as 64 hex digits (printf %s KEY | sha256sum),"
                " never the key itself",
            )
        result.append(bytes.fromhex(item.strip()))
    return result


def _read_keys(
    r: Reader, raw: object, path: str, keys: dict[bytes, str], *, in_file: bool = False
) -> None:
    """The `{consumer: digest | [digests]}` mapping at `path` into `keys` (digest -> consumer).
    The errors in a file's content are reported at the config's `keys_file` path, starting
    with where in the file they are."""

    def error(where: str, message: str) -> None:
        if not in_file:
            r.error(where, message)
        elif where.startswith(path) and where != path:
            r.error(path, f"{where[len(path) :].lstrip('.')}: {message}")
        else:
            r.error(path, message)

    if raw is None and in_file:
        return  # an empty file: no keys (every request refused until keys are added)
    if not isinstance(raw, dict):
        error(path, "must be a mapping of consumer name to the sha256 hex digest of its key")
        return
    for name, value in raw.items():
        where = f"{path}.{name}"
        try:
            consumer = credentials.check_consumer(name, where)
            digests = _digests(value, where)
        except ConfigError as exc:
            error(exc.path, exc.message)
            continue
        for digest in digests:
            other = keys.setdefault(digest, consumer)
            if other != consumer:
                error(where, f"has the same key as consumer {other!r}: one key names one consumer")


def _read_keys_file(r: Reader, file: str, path: str, keys: dict[bytes, str]) -> None:
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        r.error(path, f"cannot read {file}: {type(exc).__name__}")
        return
    try:
        raw, duplicates = load_yaml(text)
    except yaml.YAMLError as exc:
        # the position and PyYAML's problem, never the snippet of the file it quotes
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        r.error(path, f"invalid YAML{at}: {getattr(exc, 'problem', None) or 'unreadable'}")
        return
    for duplicate in duplicates:
        r.error(path, f"{duplicate.path}: {duplicate.message}")
    _read_keys(r, raw, path, keys, in_file=True)


_FIELDS: Final = Fields(
    ApiKeyConfig,
    {
        "header": as_str,
        "query": _query_name,
        "hide_credentials": as_bool,
        "realm": credentials.realm,
    },
    # read by `parse`: the digests of both sources go into one field
    extra=("keys_file", "keys"),
)


def parse(r: Reader, raw: object, path: str) -> ApiKeyConfig | None:
    m = _FIELDS.mapping(r, raw, path)
    if m is None:
        return None
    errors = len(r.errors)
    values = _FIELDS.values(r, m, path)
    if "header" in m and "query" in m:
        r.error(path, "reads the key from a header or a query parameter: set header or query")
    header = values["header"]
    if (
        "header" in m
        and check_name(r, header, f"{path}.header", OWNED_REQUEST)
        and header.lower().replace("_", "-") == "authorization"
    ):
        r.error(
            f"{path}.header",
            "Authorization carries a scheme's credentials (basic_auth, jwt): name the"
            " header the key is sent in",
        )
    if m.get("keys_file") is None and m.get("keys") is None:
        r.error(path, "needs keys_file or keys (the sha256 digests of the keys it accepts)")
    if len(r.errors) > errors:
        return None
    # the stage is kept for the pipeline's checks even when a key is refused (the load fails all
    # the same): a `consumer` key after it is not reported as lacking one
    keys: dict[bytes, str] = {}
    if m.get("keys") is not None:
        _read_keys(r, m["keys"], f"{path}.keys", keys)
    if m.get("keys_file") is not None:
        where = f"{path}.keys_file"
        found = r.resolve_file(m["keys_file"], where)
        if found is not None:
            values["keys_file"] = str(found)
            _read_keys_file(r, str(found), where, keys)
    # sorted: the same keys are the same config, so a reload that changes nothing keeps the stage
    values["keys"] = tuple(sorted(keys.items()))
    return _FIELDS.create(r, values, path, len(r.errors))


def _hidden_header(config: ApiKeyConfig) -> str | None:
    if not config.hide_credentials or config.query is not None:
        return None
    return config.header.lower()


def _check(check: PipelineCheck, config: ApiKeyConfig) -> ApiKeyConfig:
    credentials.check_pipeline(check, _KIND, _hidden_header(config))
    return config


def _upstream_headers(config: ApiKeyConfig) -> tuple[str, ...]:
    return (credentials.CONSUMER_HEADER,)


def _describe(config: ApiKeyConfig) -> dict[str, Any]:
    # where the key is read and how many consumers there are: never a digest, nor who they are
    return {
        "key": (
            {"in": "query", "name": config.query}
            if config.query is not None
            else {"in": "header", "name": config.header}
        ),
        "consumers": len({consumer for _, consumer in config.keys}),
        "hide_credentials": config.hide_credentials,
    }


def _query_keys(query: str, name: str) -> tuple[list[str], str]:
    """The raw values of parameter `name` in `query` (its name compared decoded, so that
    `api%5Fkey` is the same parameter to us as to the upstream's framework), and the query
    without them, every other parameter exactly as received."""
    values: list[str] = []
    kept: list[str] = []
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if "%" in key or "+" in key:
            key = unquote(key.replace("+", " "))
        if key == name:
            values.append(value)
        else:
            kept.append(part)
    return values, "&".join(kept)


def _without_query_key(head: RequestHead, kept: str) -> None:
    """Cut the key's parameter out of both spellings of the target the upstream may be sent:
    `query` (a rebuilt target) and the target as received (which a plain target is forwarded
    as).  `query` is the received query decoded as latin-1 (gateway.http.path.split_target), so
    the kept parameters go back byte for byte, and a plain target stays plain."""
    path = head.target.partition(b"?")[0]
    head.query = kept
    head.target = path + b"?" + kept.encode("latin-1") if kept else path


@final
class ApiKeyStage:
    __slots__ = (
        "_challenge",
        "_consumers",
        "_folded",
        "_header",
        "_hide",
        "_missing",
        "_name",
        "_outcomes",
        "_query",
        "_spelled",
    )

    def __init__(self, config: ApiKeyConfig, outcomes: StageOutcomes) -> None:
        # digest -> (consumer, the consumer as the X-Consumer value)
        self._consumers: dict[bytes, tuple[str, bytes]] = {
            digest: (consumer, consumer.encode("ascii")) for digest, consumer in config.keys
        }
        self._query = config.query
        self._header = config.header
        self._name = config.header.lower().encode("latin-1")
        #: the header's name as configured: most clients spell it so, and a compare costs less
        #: than a lower-case copy
        self._spelled = config.header.encode("latin-1")
        # the header's name as a CGI/WSGI upstream reads it ("_" is "-"): every spelling of it
        # is removed when the key is hidden
        self._folded = self._name.replace(b"_", b"-")
        self._hide = config.hide_credentials
        where, name = ("query", config.query) if config.query else ("header", config.header)
        self._challenge = [
            ("WWW-Authenticate", f'ApiKey realm="{config.realm}", in="{where}", name="{name}"')
        ]
        self._missing = (
            f"an API key is required in the {config.query} query parameter"
            if config.query
            else f"an API key is required in the {config.header} header"
        )
        self._outcomes = outcomes

    def _presented(self, head: RequestHead) -> bytes | None:
        """The key the request presents (removed from the request when hidden), or None;
        raises the 401 for a query naming the parameter twice."""
        query_name = self._query
        if query_name is None:
            # one pass finds the key and, when it is hidden, the list without any spelling of
            # its header; only a name of the header's length is lowered
            headers = head.headers
            size = len(self._name)
            found: bytes | None = None
            spellings: list[int] = []
            for i in range(len(headers)):
                name, given = headers[i]
                if len(name) == size:
                    # spelled as configured: the name itself stands for its lower case (a
                    # lower-case copy is always a new object, so `low is name` says which)
                    low = name if name == self._spelled else name.lower()
                    if low is name or low == self._name:
                        if found is not None:
                            # which one would be checked, and which one would the upstream read?
                            raise BadRequest(f"more than one {self._header} header")
                        found = given
                        spellings.append(i)
                    elif low.replace(b"_", b"-") == self._folded:
                        spellings.append(i)  # X_API_Key: X-API-Key to a CGI/WSGI upstream
            if self._hide and spellings:
                head.remove_headers(spellings)
            if found is None:
                return None
            # stripped as get_header strips ("k" and "k " are one key: llhttp keeps trailing
            # blanks); the bytes as received: the digest is of what the client sent
            if found and found[0] not in _BLANKS and found[-1] not in _BLANKS:
                return found  # nothing to strip (nearly always): no call, no copy
            return found.strip(b" \t") or None
        if not head.query:
            return None
        values, rest = _query_keys(head.query, query_name)
        if not values:
            return None
        if self._hide:
            _without_query_key(head, rest)
        if len(values) > 1:
            raise self._refused("the API key parameter is given more than once")
        value = values[0]
        if "%" not in value and "+" not in value:
            # nothing escaped (most keys are base64url or hex): the query's characters are its
            # bytes (it is the received query decoded as latin-1)
            return value.encode("latin-1") or None
        # form decoding, as the client's library encoded it ("+" is a space)
        return unquote_to_bytes(value.replace("+", " ")) or None

    def _refused(self, detail: str) -> Unauthenticated:
        return Unauthenticated(detail, headers=self._challenge)

    def __call__(self, ctx: RequestContext, call_next: Next) -> Awaitable[Response]:
        """The rest of the pipeline, once the key is known; not a coroutine (there is nothing to
        do on the way back, and nothing to wait for): a refusal raises at the call."""
        route = ctx.route.name
        try:
            key = self._presented(ctx.head)
        except (Unauthenticated, BadRequest):
            # the key given twice (a 401 in the query, a 400 in headers): counted as invalid
            self._decided(ctx, route, "invalid")
            raise
        if key is None:
            self._decided(ctx, route, "missing")
            raise self._refused(self._missing)
        # Why a dict lookup by digest is a constant-time check: what the lookup compares is the
        # sha256 of the presented key, which the client cannot steer bit by bit — changing one
        # byte of a guess changes the whole digest — so how long a lookup takes (the hash's
        # bucket, how many leading bytes of a stored digest happen to match) tells an attacker
        # nothing about how close a guess is to a key.  Comparing plain keys byte by byte would
        # leak the length of the matching prefix; hmac.compare_digest is not needed when no
        # plain key is compared at all.  The digest is not salted: keys are random tokens of
        # high entropy (unlike passwords), so an unsalted sha256 of one cannot be reversed.
        found = self._consumers.get(_SHA256_OF(key).digest())
        if found is None:
            self._decided(ctx, route, "invalid")
            raise self._refused("the API key is not valid")
        ctx.consumer = found[0]
        ctx.add_upstream_header(credentials.CONSUMER_HEADER_BYTES, found[1])
        self._decided(ctx, route, "allowed")
        return call_next(ctx)

    def _decided(self, ctx: RequestContext, route: str, outcome: str) -> None:
        self._outcomes.count(route, outcome)
        ctx.outcome(_KIND, outcome)


def build(config: ApiKeyConfig, spec: StageSpec, env: BuildContext) -> ApiKeyStage:
    return ApiKeyStage(config, StageOutcomes(env.metrics.stage_total, _KIND))


KIND: Final[StageKind[ApiKeyConfig, ApiKeyStage]] = StageKind(
    name=_KIND,
    parse=parse,
    build=build,
    example=EXAMPLE,
    check=_check,
    upstream_headers=_upstream_headers,
    describe=_describe,
)
