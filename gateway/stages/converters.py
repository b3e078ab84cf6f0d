"""Converters and rules that several stage kinds' parsers share: header names and values,
shares and statuses, stores, and the identity keys (jwt:CLAIM, mtls:san, consumer,
header:NAME) that rate limits and idempotency records are keyed on."""

from __future__ import annotations

import re
from typing import Final

from gateway.config.reader import Reader, as_int, as_str, status
from gateway.config.stages import PipelineCheck
from gateway.config.stores import STORE_NAME
from gateway.errors import ConfigError
from gateway.http.headers import REQUEST_DROP, RESPONSE_DROP

TOKEN: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VALUE: Final = re.compile(r"^[\t\x20-\x7e]*$")
#: names the gateway itself owns on the way out (framing, forwarding headers, request id)
OWNED_REQUEST: Final = frozenset(n.decode() for n in REQUEST_DROP)
OWNED_RESPONSE: Final = frozenset(n.decode() for n in RESPONSE_DROP) | {"x-request-id"}
#: the stage kinds that authenticate a consumer (`ctx.consumer`, forwarded as X-Consumer): a
#: `consumer` key needs one of them before it, and a route has at most one
CONSUMER_KINDS: Final = ("api_key", "basic_auth")


def check_name(r: Reader, name: object, where: str, owned: frozenset[str]) -> bool:
    if not isinstance(name, str) or not TOKEN.match(name):
        r.error(where, "must be a header name (letters, digits and !#$%&'*+-.^_`|~)")
        return False
    if name.lower() in owned:
        r.error(where, f"{name} is set by the gateway itself and cannot be changed here")
        return False
    return True


def header_values(
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
        if check_name(r, name, where, owned):
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                r.error(where, "must be a string")
            elif not _VALUE.match(str(value)):
                r.error(where, "must be visible ASCII, spaces and tabs (no line breaks)")
            else:
                result.append((str(name), str(value)))
    return tuple(result)


def share(value: object, path: str) -> float:
    """A ratio that must be able to trigger: 0 < x <= 1."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(path, "must be a number")
    if not 0.0 < float(value) <= 1.0:
        raise ConfigError(path, f"must be > 0 and <= 1, not {value}")
    return float(value)


def statuses(value: object, path: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "must be a non-empty list of HTTP statuses")
    return tuple(status(v, f"{path}[{i}]") for i, v in enumerate(value))


def non_negative_int(value: object, path: str) -> int:
    result = as_int(value, path)
    if result < 0:
        raise ConfigError(path, "must not be negative")
    return result


def str_list(value: object, path: str) -> tuple[str, ...]:
    """A list of non-empty strings."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(path, "must be a list of strings")
    return tuple(value)


def store_name(value: object, path: str) -> str:
    """A store's name (`memory` or one of `stores:`; the loader checks it is declared)."""
    store = as_str(value, path)
    if not STORE_NAME.match(store):
        raise ConfigError(path, "a store name is letters, digits, '_', '.' and '-'")
    return store


def client_id(value: object, path: str) -> str:
    """Whose request it is: a JWT claim, the certificate's SANs, the authenticated consumer or
    a header."""
    if isinstance(value, str):
        kind, sep, arg = value.partition(":")
        if value in ("mtls:san", "consumer") or (kind == "jwt" and sep and arg):
            return value
        if kind == "header" and sep and TOKEN.match(arg):
            return f"header:{arg.lower()}"
    raise ConfigError(path, "must be jwt:CLAIM, mtls:san, consumer or header:NAME")


def check_identity_key(check: PipelineCheck, key: str, what: str) -> None:
    """A key read from an earlier stage's work (a JWT claim, certificate SANs, a consumer)
    needs that stage before it; a header the pipeline sets for the upstream is never the
    client's: clients' copies are dropped, so every client would share one bucket, or every
    request be refused — and until they are dropped, they are whatever the client chose."""
    before = check.kinds_before
    if key == "consumer":
        if not before & set(CONSUMER_KINDS):
            check.error(f"{what} consumer needs an api_key or basic_auth stage before it")
        return
    needs = "jwt" if key.startswith("jwt:") else "mtls" if key == "mtls:san" else ""
    if needs and needs not in before:
        check.error(f"{what} {key} needs a {needs} stage before it")
    if key.startswith("header:"):
        name = key[len("header:") :].lower()
        setter = check.upstream_headers.get(name)
        if setter in CONSUMER_KINDS or name == "x-consumer":
            # read from the request, X-Consumer is the client's own copy (dropped only on the
            # way upstream): a key anyone may set to anyone's name
            check.error(
                f"{what} {key} is the client's copy of X-Consumer, never the authenticated"
                " one: key on consumer instead"
            )
        elif setter is not None:
            check.error(
                f"{what} {key} names a header the {setter} stage sets for the upstream (clients'"
                " copies are dropped): key on the claim instead (jwt:CLAIM)"
            )
