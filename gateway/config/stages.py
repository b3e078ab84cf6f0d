"""Pipeline entries in the config: `middlewares:` and each route's `pipeline:` (SPEC §2, §5).

An entry is either the name of a middleware or a mapping with exactly one key, the stage kind,
whose value is that stage's config.  Each kind's config is parsed here into its frozen model
class; kinds that later issues build are reported as not supported yet, at their YAML path.
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING, Final

from gateway.config.model import HeaderEdits, HeadersConfig, StageConfig, StageSpec
from gateway.http.headers import REQUEST_DROP, RESPONSE_DROP

if TYPE_CHECKING:
    from gateway.config.load import _Reader

_LATER_KINDS: Final = {
    "mtls": "TLS and mTLS",
    "jwt": "JWT authentication",
    "rate_limit": "rate limiting",
    "circuit_breaker": "the circuit breaker",
    "retry": "retries",
    "idempotency": "idempotency",
}
KINDS: Final = frozenset({"headers"})

_TOKEN: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VALUE: Final = re.compile(r"^[\t\x20-\x7e]*$")
#: names the gateway itself owns on the way out (framing, forwarding headers, request id)
_OWNED_REQUEST: Final = frozenset(n.decode() for n in REQUEST_DROP)
_OWNED_RESPONSE: Final = frozenset(n.decode() for n in RESPONSE_DROP) | {"x-request-id"}


def parse_entry(
    r: _Reader, raw: object, path: str, owner: str, middlewares: dict[str, StageSpec] | None
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


def _headers(r: _Reader, raw: object, path: str) -> StageConfig | None:
    m = r.mapping({} if raw is None else raw, path, {"request", "response"})
    if m is None:
        return None
    return HeadersConfig(
        request=_edits(r, m.get("request"), f"{path}.request", _OWNED_REQUEST),
        response=_edits(r, m.get("response"), f"{path}.response", _OWNED_RESPONSE),
    )


def _edits(r: _Reader, raw: object, path: str, owned: frozenset[str]) -> HeaderEdits:
    if raw is None:
        return HeaderEdits()
    m = r.mapping(raw, path, {"set", "remove"})
    if m is None:
        return HeaderEdits()
    pairs: list[tuple[str, str]] = []
    names: list[str] = []
    given = m.get("set")
    if given is not None:
        if not isinstance(given, dict):
            r.error(f"{path}.set", "must be a mapping of header name to value")
        else:
            for name, value in given.items():
                where = f"{path}.set.{name}"
                if _check_name(r, name, where, owned):
                    if isinstance(value, bool) or not isinstance(value, str | int | float):
                        r.error(where, "must be a string")
                    elif not _VALUE.match(str(value)):
                        r.error(where, "must be visible ASCII, spaces and tabs (no line breaks)")
                    else:
                        pairs.append((str(name), str(value)))
    removed = m.get("remove")
    if removed is not None:
        if not isinstance(removed, list):
            r.error(f"{path}.remove", "must be a list of header names")
        else:
            for i, name in enumerate(removed):
                if _check_name(r, name, f"{path}.remove[{i}]", owned):
                    names.append(str(name))
    return HeaderEdits(set=tuple(pairs), remove=tuple(names))


def _check_name(r: _Reader, name: object, where: str, owned: frozenset[str]) -> bool:
    if not isinstance(name, str) or not _TOKEN.match(name):
        r.error(where, "must be a header name (letters, digits and !#$%&'*+-.^_`|~)")
        return False
    if name.lower() in owned:
        r.error(where, f"{name} is set by the gateway itself and cannot be changed here")
        return False
    return True


_PARSERS: Final = {"headers": _headers}
