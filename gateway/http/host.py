"""The Host header, normalized once: what is routed on, what is forwarded, what is refused.

A host that two parts of the gateway could read differently is a routing bypass (a trailing
space once skipped a host-matched route and its jwt stage), so the value is normalized here, as
soon as the head is complete, and nothing else ever reads the raw header:

- optional whitespace around the value is trimmed (llhttp keeps trailing spaces and tabs);
- the value must be `uri-host [":" port]` in the strict form an edge expects: a DNS-style name
  (letters, digits, "-", "_", "."), an IPv4 address, or a bracketed IPv6 address, then an
  optional port of at most five digits.  RFC 3986 also allows percent-encoding and sub-delims
  ("!$&'()*+,;=") in a reg-name; no real host needs them and "," or ";" in X-Forwarded-Host is
  an injection, so they get 400 like any other invalid host;
- the name is lower-cased, and one trailing dot (the fully-qualified spelling) is removed; an
  IPv6 address takes its compressed form;
- the port is kept in the forwarded value (applications build absolute URLs from it) and
  dropped from the name that routing compares.

An empty Host is valid HTTP/1.1 (a target without authority): it matches only routes without
`host:`.  Results are cached per raw value, since a gateway sees few distinct hosts.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from gateway.errors import BadRequest

#: bytes a host value may contain at all (brackets and colon are checked structurally after)
_HOST_BYTES: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._:[]"
_OWS: Final = b" \t"
#: distinct raw Host values remembered; the cache is emptied when it grows past this
_CACHE_SIZE: Final = 1024

_cache: dict[bytes, tuple[bytes, str]] = {}


def normalize_host(raw: bytes) -> tuple[bytes, str]:
    """(the value forwarded upstream, the lower-case name routed on); BadRequest if invalid."""
    cached = _cache.get(raw)
    if cached is not None:
        return cached
    result = _normalize(raw)
    if len(_cache) >= _CACHE_SIZE:
        _cache.clear()  # an attacker cycling hosts costs a rebuild, never unbounded memory
    _cache[raw] = result
    return result


def _normalize(raw: bytes) -> tuple[bytes, str]:
    value = raw.strip(_OWS)
    if not value:
        return b"", ""
    if value.translate(None, _HOST_BYTES):
        raise BadRequest("invalid Host header")
    value = value.lower()
    if value[0] == 0x5B:  # "["
        name, port = _split_ip_literal(value)
    else:
        name, colon, port = value.partition(b":")
        if not colon:
            port = None
        if 0x5B in name or 0x5D in name:  # "[" or "]" (ints: a plain memchr)
            raise BadRequest("invalid Host header")
        # empty labels are refused before the one trailing dot goes: "a.." must not become "a."
        if not name or name[0] == 0x2E or name.find(b"..") >= 0:
            raise BadRequest("invalid Host header: empty label")
        if name.endswith(b"."):
            name = name[:-1]
    if port and (len(port) > 5 or not port.isdigit() or int(port) > 65535):
        raise BadRequest("invalid Host header: bad port")
    text = name.decode("ascii")
    forwarded = b"[" + name + b"]" if value[0] == 0x5B else name
    if port is not None:
        forwarded += b":" + port
    return forwarded, text


def _split_ip_literal(value: bytes) -> tuple[bytes, bytes | None]:
    """`[v6]` or `[v6]:port` -> (v6 address, port); no zone ids, no IPvFuture."""
    end = value.find(b"]")
    if end < 0:
        raise BadRequest("invalid Host header: unclosed IPv6 literal")
    rest = value[end + 1 :]
    try:
        # one spelling per address: [0:0::1] and [::1] must route alike
        address = ipaddress.IPv6Address(value[1:end].decode("ascii")).compressed.encode("ascii")
    except ValueError:
        raise BadRequest("invalid Host header: bad IPv6 literal") from None
    if not rest:
        return address, None
    if rest[0] != 0x3A:  # ":"
        raise BadRequest("invalid Host header")
    return address, rest[1:]
