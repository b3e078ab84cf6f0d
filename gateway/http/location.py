"""`Location` values for the redirects the gateway answers itself (SPEC §5.8): the `redirect`
stage's and a listener's `redirect_https`.

Whatever part of a request ends up in a Location — its path, its query, its host name — goes
through here, so a client can never turn the value into something other than one path and one
query on the host the operator chose:

- every character outside RFC 3986's `pchar` (and `/`, and `?` in a query) is percent-encoded,
  as is a `%` that does not start a valid escape: CR, LF, NUL, spaces, `\\`, `#`, quotes and
  non-ASCII can never reach the header, nor split it, nor end the path early;
- a path keeps exactly one leading `/`: `//evil.example/x` (a network-path reference, which a
  browser would follow to evil.example) and `/\\evil.example` (browsers read `\\` as `/`) become
  `/evil.example/x` and `/%5Cevil.example`;
- a host comes only from config or from the request's normalized Host (gateway.http.host), which
  holds letters, digits, `-`, `_`, `.` and a bracketed IPv6 address, nothing else.
"""

from __future__ import annotations

import string
from typing import Final

_PCHAR: Final = frozenset(string.ascii_letters + string.digits + "-._~" + "!$&'()*+,;=" + ":@")
_PATH_SAFE: Final = _PCHAR | {"/"}
_QUERY_SAFE: Final = _PCHAR | {"/", "?"}
_HEX: Final = frozenset(string.hexdigits)


def _encode(text: str, safe: frozenset[str]) -> str:
    if all(c in safe for c in text):
        return text  # the common case: nothing to encode, no copy
    out: list[str] = []
    for i, c in enumerate(text):
        if c in safe:
            out.append(c)
        elif c == "%" and text[i + 1 : i + 2] in _HEX and text[i + 2 : i + 3] in _HEX:
            # an escape already (the normalized path keeps those of reserved characters)
            out.append(c)
        else:
            out.append("".join(f"%{b:02X}" for b in c.encode("utf-8")))
    return "".join(out)


def location_path(path: str) -> str:
    """`path` as it may stand in a Location: encoded, starting with exactly one `/`."""
    return "/" + _encode(path, _PATH_SAFE).lstrip("/")


def location_query(query: str) -> str:
    """A query string (without its `?`) as it may stand in a Location: encoded."""
    return _encode(query, _QUERY_SAFE)


def host_only(forwarded: bytes) -> str:
    """The host of a normalized Host value (gateway.http.host: `name[:port]`, an IPv6 address
    in brackets) without its port."""
    text = forwarded.decode("ascii")
    if text.startswith("["):
        return text[: text.index("]") + 1]
    return text.partition(":")[0]


def with_port(host: str, port: int | None, default: int) -> str:
    """`host:port`, or `host` alone when the port is None or the scheme's `default`."""
    return host if port is None or port == default else f"{host}:{port}"
