"""Pipeline entries in the config: `middlewares:` and each route's `pipeline:` (SPEC §2, §5).

An entry is either the name of a middleware or a mapping with exactly one key, the stage kind,
whose value is that stage's config.  Each kind's config is parsed here into its frozen model
class; kinds that later issues build are reported as not supported yet, at their YAML path.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from dataclasses import replace
from typing import Final

from gateway.config.model import (
    RETRY_FAILURES,
    CircuitBreakerConfig,
    FallbackConfig,
    HeaderEdits,
    HeadersConfig,
    IdempotencyConfig,
    IdempotencyTokenConfig,
    JwtConfig,
    MtlsConfig,
    RateLimitConfig,
    RetryConfig,
    SlowCallConfig,
    StageConfig,
    StageSpec,
)
from gateway.config.reader import (
    Reader,
    as_bool,
    as_int,
    as_str,
    positive_duration,
    positive_int,
    positive_size,
    status,
)
from gateway.config.units import parse_duration
from gateway.errors import ConfigError
from gateway.http.headers import REQUEST_DROP, RESPONSE_DROP
from gateway.jwt import ALGORITHMS, HMAC_ALGORITHMS, JwksProblem, hmac_key, read_jwks

_LATER_KINDS: Final[dict[str, str]] = {}
KINDS: Final = frozenset(
    {"headers", "rate_limit", "circuit_breaker", "retry", "mtls", "jwt", "idempotency"}
)

_TOKEN: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VALUE: Final = re.compile(r"^[\t\x20-\x7e]*$")
#: names the gateway itself owns on the way out (framing, forwarding headers, request id)
_OWNED_REQUEST: Final = frozenset(n.decode() for n in REQUEST_DROP)
_OWNED_RESPONSE: Final = frozenset(n.decode() for n in RESPONSE_DROP) | {"x-request-id"}


def parse_entry(
    r: Reader, raw: object, path: str, owner: str, middlewares: dict[str, StageSpec] | None
) -> StageSpec | None:
    """One pipeline entry; `middlewares` is None while the middlewares themselves are read."""
    if isinstance(raw, str) and middlewares is not None:
        spec = middlewares.get(raw)
        if spec is None:
            hint = difflib.get_close_matches(raw, sorted(middlewares), n=1)
            r.error(
                path,
                f"unknown middleware {raw!r}" + (f" (did you mean '{hint[0]}'?)" if hint else ""),
            )
        return spec
    if not isinstance(raw, dict) or len(raw) != 1:
        what = "a middleware name or " if middlewares is not None else ""
        r.error(path, f"must be {what}a mapping with one stage kind, e.g. {{headers: {{...}}}}")
        return None
    [(kind, value)] = raw.items()
    where = f"{path}.{kind}"
    if kind in _LATER_KINDS:
        r.error(where, f"not supported yet (arrives with {_LATER_KINDS[kind]})")
        return None
    if kind not in KINDS:
        known = sorted(KINDS | set(_LATER_KINDS))
        hint = difflib.get_close_matches(str(kind), known, n=1)
        r.error(
            where,
            "unknown stage kind"
            + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f"; stages: {', '.join(known)}",
        )
        return None
    config = _PARSERS[kind](r, value, where)
    return None if config is None else StageSpec(kind=kind, config=config, owner=owner)


def _headers(r: Reader, raw: object, path: str) -> StageConfig | None:
    m = r.mapping({} if raw is None else raw, path, {"request", "response"})
    if m is None:
        return None
    return HeadersConfig(
        request=_edits(r, m.get("request"), f"{path}.request", _OWNED_REQUEST),
        response=_edits(r, m.get("response"), f"{path}.response", _OWNED_RESPONSE),
    )


def _edits(r: Reader, raw: object, path: str, owned: frozenset[str]) -> HeaderEdits:
    if raw is None:
        return HeaderEdits()
    m = r.mapping(raw, path, {"set", "remove"})
    if m is None:
        return HeaderEdits()
    pairs: list[tuple[str, str]] = []
    names: list[str] = []
    pairs.extend(_header_values(r, m.get("set"), f"{path}.set", owned))
    removed = m.get("remove")
    if removed is not None:
        if not isinstance(removed, list):
            r.error(f"{path}.remove", "must be a list of header names")
        else:
            for i, name in enumerate(removed):
                if _check_name(r, name, f"{path}.remove[{i}]", owned):
                    names.append(str(name))
    return HeaderEdits(set=tuple(pairs), remove=tuple(names))


def _check_name(r: Reader, name: object, where: str, owned: frozenset[str]) -> bool:
    if not isinstance(name, str) or not _TOKEN.match(name):
        r.error(where, "must be a header name (letters, digits and !#$%&'*+-.^_`|~)")
        return False
    if name.lower() in owned:
        r.error(where, f"{name} is set by the gateway itself and cannot be changed here")
        return False
    return True


def _number(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(path, "must be a number")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(path, "must be > 0")
    return float(value)


def _share(value: object, path: str) -> float:
    """A ratio that must be able to trigger: 0 < x <= 1."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(path, "must be a number")
    if not 0.0 < float(value) <= 1.0:
        raise ConfigError(path, f"must be > 0 and <= 1, not {value}")
    return float(value)


def _statuses(value: object, path: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "must be a non-empty list of HTTP statuses")
    return tuple(status(v, f"{path}[{i}]") for i, v in enumerate(value))


#: rate-limit key kinds; the ones with a value after the colon are listed with it
_KEY_KINDS: Final = ("client_ip", "route", "mtls:san", "header:NAME", "jwt:CLAIM")


def _rate_key(value: object, path: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(path, "must name at least one key")
    keys: list[str] = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if isinstance(value, list) else path
        if not isinstance(item, str):
            raise ConfigError(where, f"must be one of {', '.join(_KEY_KINDS)}")
        kind, sep, arg = item.partition(":")
        if item in ("client_ip", "route", "mtls:san"):
            key = item
        elif kind == "header" and sep and _TOKEN.match(arg):
            key = f"header:{arg.lower()}"
        elif kind == "jwt" and sep and arg:
            key = item
        else:
            hint = difflib.get_close_matches(item, _KEY_KINDS, n=1)
            raise ConfigError(
                where,
                f"unknown key kind {item!r}"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f"; keys: {', '.join(_KEY_KINDS)}",
            )
        if key in keys:
            raise ConfigError(where, f"{item} is listed twice")
        keys.append(key)
    return tuple(keys)


def _store_settings(
    r: Reader, m: dict[str, object], path: str, on_error_default: str
) -> tuple[str, str]:
    """`store` and `on_store_error`, shared by the stages that keep state in a store."""
    store = r.get(m, "store", path, as_str, "memory")
    if store != "memory":
        # named stores (`stores:`) arrive with Redis; until then memory is the only one
        r.error(f"{path}.store", f"unknown store {store!r}; stores: memory")
    on_error = r.get(m, "on_store_error", path, as_str, on_error_default)
    if on_error not in ("allow", "deny"):
        r.error(f"{path}.on_store_error", "must be allow or deny")
    return store, on_error


def _rate_limit(r: Reader, raw: object, path: str) -> StageConfig | None:
    keys = {"rate", "per", "burst", "key", "max_keys", "store", "on_store_error"}
    m = r.mapping(raw, path, keys, required=("rate",))
    if m is None or "rate" not in m:
        return None
    errors = len(r.errors)
    rate = r.get(m, "rate", path, _number, 1.0)
    per = r.get(m, "per", path, positive_duration, 1.0)
    burst = r.get(m, "burst", path, positive_int, max(1, math.ceil(rate)))
    default_key: tuple[str, ...] = ("client_ip",)
    key = r.get(m, "key", path, _rate_key, default_key)
    max_keys = r.get(m, "max_keys", path, positive_int, 100_000)
    store, on_error = _store_settings(r, m, path, "allow")
    if len(r.errors) > errors:
        return None
    return RateLimitConfig(
        rate=rate,
        per=per,
        burst=burst,
        key=key,
        max_keys=max_keys,
        store=store,
        on_store_error="deny" if on_error == "deny" else "allow",
    )


def _circuit_breaker(r: Reader, raw: object, path: str) -> StageConfig | None:
    keys = {
        "window",
        "min_requests",
        "failure_ratio",
        "failure_statuses",
        "slow_call",
        "open_for",
        "max_open_for",
        "half_open_requests",
        "fallback",
    }
    m = r.mapping({} if raw is None else raw, path, keys)
    if m is None:
        return None
    errors = len(r.errors)
    d = CircuitBreakerConfig()
    slow = None
    if m.get("slow_call") is not None:
        where = f"{path}.slow_call"
        s = r.mapping(m["slow_call"], where, {"duration", "ratio"}, required=("duration", "ratio"))
        if s is not None and "duration" in s and "ratio" in s:
            slow = SlowCallConfig(
                duration=r.get(s, "duration", where, positive_duration, 1.0),
                ratio=r.get(s, "ratio", where, _share, 1.0),
            )
    fallback = None
    if m.get("fallback") is not None:
        where = f"{path}.fallback"
        f = r.mapping(m["fallback"], where, {"status", "body", "headers"})
        if f is not None:
            fallback = FallbackConfig(
                status=r.get(f, "status", where, status, 503),
                body=r.get(f, "body", where, as_str, ""),
                headers=_header_values(r, f.get("headers"), f"{where}.headers", _OWNED_RESPONSE),
            )
    config = CircuitBreakerConfig(
        window=r.get(m, "window", path, positive_duration, d.window),
        min_requests=r.get(m, "min_requests", path, positive_int, d.min_requests),
        failure_ratio=r.get(m, "failure_ratio", path, _share, d.failure_ratio),
        failure_statuses=r.get(m, "failure_statuses", path, _statuses, d.failure_statuses),
        slow_call=slow,
        open_for=r.get(m, "open_for", path, positive_duration, d.open_for),
        max_open_for=r.get(m, "max_open_for", path, positive_duration, d.max_open_for),
        half_open_requests=r.get(m, "half_open_requests", path, positive_int, d.half_open_requests),
        fallback=fallback,
    )
    if config.max_open_for < config.open_for:
        r.error(f"{path}.max_open_for", "must be at least open_for")
    return None if len(r.errors) > errors else config


def _header_values(
    r: Reader, raw: object, path: str, owned: frozenset[str]
) -> tuple[tuple[str, str], ...]:
    """A mapping of header name to value: names checked, values one safe line each."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        r.error(path, "must be a mapping of header name to value")
        return ()
    result = []
    for name, value in raw.items():
        where = f"{path}.{name}"
        if _check_name(r, name, where, owned):
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                r.error(where, "must be a string")
            elif not _VALUE.match(str(value)):
                r.error(where, "must be visible ASCII, spaces and tabs (no line breaks)")
            else:
                result.append((str(name), str(value)))
    return tuple(result)


def _retry_on(value: object, path: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "must be a non-empty list of failures and statuses")
    kinds: list[str] = []
    statuses: list[int] = []
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if isinstance(item, str) and item in RETRY_FAILURES:
            kinds.append(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            code = status(item, where)
            if code < 400:
                raise ConfigError(where, "only error statuses (400-599) can be retried")
            statuses.append(code)
        else:
            hint = difflib.get_close_matches(str(item), RETRY_FAILURES, n=1)
            raise ConfigError(
                where,
                f"unknown failure {item!r}"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f"; use {', '.join(RETRY_FAILURES)} or a status such as 503",
            )
    return tuple(dict.fromkeys(kinds)), tuple(dict.fromkeys(statuses))


def _retry(r: Reader, raw: object, path: str) -> StageConfig | None:
    keys = {"attempts", "per_try_timeout", "backoff", "retry_on", "budget"}
    m = r.mapping({} if raw is None else raw, path, keys)
    if m is None:
        return None
    errors = len(r.errors)
    d = RetryConfig()
    attempts = r.get(m, "attempts", path, positive_int, d.attempts)
    if attempts > 10:
        r.error(f"{path}.attempts", "must be at most 10")
    base, cap = d.backoff_base, d.backoff_max
    if m.get("backoff") is not None:
        where = f"{path}.backoff"
        b = r.mapping(m["backoff"], where, {"base", "max"})
        if b is not None:
            base = r.get(b, "base", where, positive_duration, base)
            cap = r.get(b, "max", where, positive_duration, max(cap, base))
            if cap < base:
                r.error(f"{where}.max", "must be at least base")
    kinds, statuses = r.get(m, "retry_on", path, _retry_on, (d.retry_on, d.retry_statuses))
    ratio, minimum = d.budget_ratio, d.budget_min_concurrent
    if m.get("budget") is not None:
        where = f"{path}.budget"
        b = r.mapping(m["budget"], where, {"ratio", "min_concurrent"})
        if b is not None:
            ratio = r.get(b, "ratio", where, _share, ratio)
            minimum = r.get(b, "min_concurrent", where, _non_negative_int, minimum)
    if len(r.errors) > errors:
        return None
    return RetryConfig(
        attempts=attempts,
        per_try_timeout=r.get(m, "per_try_timeout", path, positive_duration, None),
        backoff_base=base,
        backoff_max=cap,
        retry_on=kinds,
        retry_statuses=statuses,
        budget_ratio=ratio,
        budget_min_concurrent=minimum,
    )


def _non_negative_int(value: object, path: str) -> int:
    result = as_int(value, path)
    if result < 0:
        raise ConfigError(path, "must not be negative")
    return result


def _globs(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "must be a non-empty list of patterns")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{path}[{i}]", "must be a pattern (text, * and ? as wildcards)")
    return tuple(value)


def _mtls(r: Reader, raw: object, path: str) -> StageConfig | None:
    keys = {"required", "allowed_sans", "allowed_subjects", "forward"}
    m = r.mapping({} if raw is None else raw, path, keys)
    if m is None:
        return None
    errors = len(r.errors)
    required = r.get(m, "required", path, as_bool, True)
    forward = r.get(m, "forward", path, as_str, "rfc9440")
    if forward not in ("rfc9440", "xfcc", "none"):
        r.error(f"{path}.forward", "must be rfc9440, xfcc or none")
    none: tuple[str, ...] = ()
    sans = r.get(m, "allowed_sans", path, _globs, none)
    subjects = r.get(m, "allowed_subjects", path, _globs, none)
    if len(r.errors) > errors:
        return None
    return MtlsConfig(
        required=required,
        allowed_sans=sans,
        allowed_subjects=subjects,
        forward="xfcc" if forward == "xfcc" else "none" if forward == "none" else "rfc9440",
    )


def _jwt(r: Reader, raw: object, path: str) -> StageConfig | None:
    keys = {
        "issuer",
        "audiences",
        "algorithms",
        "jwks_file",
        "jwks_url",
        "secret",
        "leeway",
        "required_claims",
        "forward_claims",
        "jwks_refresh",
        "cache_size",
    }
    m = r.mapping(raw, path, keys, required=("algorithms",))
    if m is None or "algorithms" not in m:
        return None
    errors = len(r.errors)
    fallback: tuple[str, ...] = ("RS256",)
    algorithms = r.get(m, "algorithms", path, _algorithms, fallback)
    sources = [k for k in ("jwks_file", "jwks_url", "secret") if m.get(k) is not None]
    if len(sources) != 1:
        r.error(path, "needs exactly one key source: jwks_file, jwks_url or secret")
    hmac_only = set(algorithms) <= HMAC_ALGORITHMS
    if sources == ["secret"] and not hmac_only:
        r.error(f"{path}.algorithms", "a secret verifies HMAC algorithms (HS*) only")
    if sources and sources[0] != "secret" and hmac_only:
        r.error(f"{path}.algorithms", "HS* algorithms need a secret, not public keys")
    secret = r.get(m, "secret", path, as_str, None)
    if secret is not None:
        try:
            hmac_key(secret, algorithms)
        except JwksProblem as exc:
            r.error(f"{path}.secret", str(exc))
    digest = ""
    jwks_file = None
    if m.get("jwks_file") is not None:
        found = r.resolve_file(m["jwks_file"], f"{path}.jwks_file")
        if found is not None:
            jwks_file = str(found)
            content = found.read_bytes()
            digest = hashlib.sha256(content).hexdigest()
            try:
                # unusable keys are skipped (the stage logs and counts them); none left is an error
                keyset = read_jwks(content)
                if not keyset.usable_for(algorithms):
                    r.error(f"{path}.jwks_file", keyset.no_key_problem(algorithms))
            except JwksProblem as exc:
                r.error(f"{path}.jwks_file", str(exc))
    url = r.get(m, "jwks_url", path, as_str, None)
    if url is not None and not re.match(r"^https?://[^/\s]+", url):
        r.error(f"{path}.jwks_url", "must be an http(s) URL")
    forward: list[tuple[str, str]] = []
    given = m.get("forward_claims")
    if given is not None:
        if not isinstance(given, dict):
            r.error(f"{path}.forward_claims", "must be a mapping of claim to header name")
        else:
            for claim, header in given.items():
                if _check_name(r, header, f"{path}.forward_claims.{claim}", _OWNED_REQUEST):
                    forward.append((str(claim), str(header)))
    d_leeway, d_refresh = 30.0, 300.0
    config = JwtConfig(
        issuer=r.get(m, "issuer", path, as_str, None),
        audiences=r.get(m, "audiences", path, _str_list, ()),
        algorithms=algorithms,
        jwks_file=jwks_file,
        jwks_url=url,
        secret=secret,
        jwks_digest=digest,
        leeway=r.get(m, "leeway", path, parse_duration, d_leeway),
        required_claims=r.get(m, "required_claims", path, _str_list, ()),
        forward_claims=tuple(forward),
        jwks_refresh=r.get(m, "jwks_refresh", path, positive_duration, d_refresh),
        cache_size=r.get(m, "cache_size", path, positive_int, 10_000),
    )
    return None if len(r.errors) > errors else config


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


def _str_list(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(path, "must be a list of strings")
    return tuple(value)


def _client_id(value: object, path: str) -> str:
    if isinstance(value, str):
        kind, sep, arg = value.partition(":")
        if value == "mtls:san" or (kind == "jwt" and sep and arg):
            return value
        if kind == "header" and sep and _TOKEN.match(arg):
            return f"header:{arg.lower()}"
    raise ConfigError(path, "must be jwt:CLAIM, mtls:san or header:NAME")


#: idempotency scopes, the ones with a value after the colon listed with it
_SCOPES: Final = ("auto", "none", "client_ip", "header:NAME", "jwt:CLAIM", "mtls:san")


def _scope(value: object, path: str) -> str:
    if value in ("auto", "none", "client_ip"):
        return str(value)
    try:
        return _client_id(value, path)
    except ConfigError:
        raise ConfigError(path, f"must be {', '.join(_SCOPES[:-1])} or {_SCOPES[-1]}") from None


def _idempotency(r: Reader, raw: object, path: str) -> StageConfig | None:
    keys = {
        "header",
        "methods",
        "required",
        "ttl",
        "store",
        "on_store_error",
        "max_response_bytes",
        "max_keys",
        "max_bytes",
        "scope",
        "token",
        "upstream_deduplicates",
    }
    m = r.mapping({} if raw is None else raw, path, keys)
    if m is None:
        return None
    errors = len(r.errors)
    d = IdempotencyConfig()
    header = r.get(m, "header", path, as_str, d.header)
    if not _TOKEN.match(header):
        r.error(f"{path}.header", "must be a header name")
    methods = d.methods
    if m.get("methods") is not None:
        given = m["methods"]
        if not isinstance(given, list) or not given or not all(isinstance(x, str) for x in given):
            r.error(f"{path}.methods", "must be a non-empty list of methods")
        else:
            methods = tuple(str(x).upper() for x in given)
    store, on_error = _store_settings(r, m, path, "deny")
    token = None
    if m.get("token") is not None:
        where = f"{path}.token"
        t = r.mapping(
            m["token"], where, {"secret", "window", "client_id"}, required=("secret", "client_id")
        )
        if t is not None and "secret" in t and "client_id" in t:
            secret = r.get(t, "secret", where, as_str, "")
            if len(secret.encode()) < 32:
                r.error(f"{where}.secret", "must be at least 32 bytes (use ${ENV})")
            token = IdempotencyTokenConfig(
                secret=secret,
                window=r.get(t, "window", where, positive_duration, 300.0),
                client_id=r.get(t, "client_id", where, _client_id, "header:x-client-id"),
            )
    config = IdempotencyConfig(
        header=header,
        methods=methods,
        required=r.get(m, "required", path, as_bool, True),
        ttl=r.get(m, "ttl", path, positive_duration, d.ttl),
        store=store,
        on_store_error="allow" if on_error == "allow" else "deny",
        max_response_bytes=r.get(
            m, "max_response_bytes", path, positive_size, d.max_response_bytes
        ),
        max_keys=r.get(m, "max_keys", path, positive_int, d.max_keys),
        max_bytes=r.get(m, "max_bytes", path, positive_size, d.max_bytes),
        scope=r.get(m, "scope", path, _scope, d.scope),
        token=token,
        upstream_deduplicates=r.get(m, "upstream_deduplicates", path, as_bool, False),
    )
    if config.max_bytes < config.max_response_bytes:
        r.error(
            f"{path}.max_bytes",
            f"must be at least max_response_bytes ({config.max_response_bytes}), or responses"
            " that size could never be kept",
        )
    return None if len(r.errors) > errors else config


_PARSERS: Final = {
    "idempotency": _idempotency,
    "jwt": _jwt,
    "mtls": _mtls,
    "headers": _headers,
    "rate_limit": _rate_limit,
    "circuit_breaker": _circuit_breaker,
    "retry": _retry,
}


def _needs(key: str) -> str:
    """The stage kind an identity key reads from, if any (a jwt claim, certificate SANs)."""
    return "jwt" if key.startswith("jwt:") else "mtls" if key == "mtls:san" else ""


def _require_before(r: Reader, path: str, before: set[str], key: str, what: str) -> None:
    needs = _needs(key)
    if needs and needs not in before:
        r.error(path, f"{what} {key} needs a {needs} stage before it")


def check_pipeline(
    r: Reader, specs: list[tuple[str, StageSpec]], auto_scopes: dict[str, tuple[str, str]]
) -> list[StageSpec]:
    """Rules between the stages of one route's pipeline (each given with its YAML path); the
    pipeline with what depends on earlier stages resolved: an idempotency `scope: auto`.

    `auto_scopes` remembers, across routes, what each named middleware's `auto` became and
    where: one instance serves every route that names it, so it must become the same.
    """
    before: set[str] = set()
    result: list[StageSpec] = []
    # headers a jwt stage sets for the upstream: a client's copies are dropped, so a key or a
    # scope read from one would always be empty (every client in one bucket, or every request
    # refused)
    forwarded = {
        header.lower()
        for _, spec in specs
        if isinstance(spec.config, JwtConfig)
        for _, header in spec.config.forward_claims
    }
    for i, (path, spec) in enumerate(specs):
        config = spec.config
        if isinstance(config, RateLimitConfig):
            for key in config.key:
                _require_before(r, path, before, key, "rate-limit key")
                _refuse_forwarded(r, path, key, forwarded, "rate-limit key")
        if isinstance(config, IdempotencyConfig):
            later = [(p, s.kind) for p, s in specs[i + 1 :] if s.kind in ("jwt", "mtls")]
            if later:
                where, kind = later[0]
                r.error(
                    path,
                    f"idempotency must come after the {kind} stage ({where}): a replayed answer"
                    " would skip authentication, and records could not belong to the client",
                )
            if config.token is not None:
                _require_before(r, path, before, config.token.client_id, "token client_id")
                _refuse_forwarded(r, path, config.token.client_id, forwarded, "token client_id")
            _require_before(r, path, before, config.scope, "idempotency scope")
            _refuse_forwarded(r, path, config.scope, forwarded, "idempotency scope")
            if config.scope == "auto":
                spec = _resolve_auto_scope(r, path, spec, config, before, auto_scopes)
        before.add(spec.kind)
        result.append(spec)
    return result


def _refuse_forwarded(r: Reader, path: str, key: str, forwarded: set[str], what: str) -> None:
    if key.startswith("header:") and key[len("header:") :].lower() in forwarded:
        r.error(
            path,
            f"{what} {key} names a header the jwt stage sets for the upstream (clients' copies"
            " are dropped): key on the claim instead (jwt:CLAIM)",
        )


def _resolve_auto_scope(
    r: Reader,
    path: str,
    spec: StageSpec,
    config: IdempotencyConfig,
    before: set[str],
    auto_scopes: dict[str, tuple[str, str]],
) -> StageSpec:
    """The client an earlier stage authenticated — a JWT's subject, else a certificate's SANs
    — or, with neither, the key alone."""
    scope = "jwt:sub" if "jwt" in before else "mtls:san" if "mtls" in before else "none"
    if spec.owner.startswith("middleware:"):
        first, where = auto_scopes.setdefault(spec.owner, (scope, path))
        if first != scope:
            name = spec.owner.removeprefix("middleware:")
            r.error(
                path,
                f"middleware {name!r} has scope: auto, which is {first} in {where} but {scope}"
                " here (one instance serves both): set its scope",
            )
    return replace(spec, config=replace(config, scope=scope))
