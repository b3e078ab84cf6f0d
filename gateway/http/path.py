"""Request-target normalization: raw request-line bytes -> the one path that is routed.

Invariant: the path returned is the path that is routed, authorized and forwarded, so no two
spellings of one resource can reach different routes.  It always starts with "/", contains no
"//", no "." or ".." segment, no percent-encoded unreserved character, no percent-encoded "/",
"\\" or NUL, only upper-case percent-escapes, and only printable ASCII other than "#" and "\\".
The query is passed through as received, checked only for printable ASCII.  Everything refused
raises `BadRequest`.

The common case (a plain origin-form path) is answered by a handful of C-level string scans;
only a target containing "%", "//", "/." or a suspicious byte takes the slow path.  The work is
done on `str` rather than `bytes` because CPython's substring tests are several times cheaper on
`str`, and `isascii()` is O(1) there.
"""

from __future__ import annotations

import string
from typing import Final

from gateway.errors import BadRequest

#: `split_target`'s flags: path spellings that upstreams may read differently from the gateway;
#: each route refuses those its `http` rules do not allow (README, "Request rules")
PATH_SEMICOLON = 1  # ";": Tomcat and Spring strip ";params" from segments, so "/..;/" is ".."
PATH_ESCAPED_PERCENT = 2  # "%25": an upstream that decodes twice sees the next escape decoded
PATH_ESCAPED_SEMICOLON = 4  # "%3B": decoded, then stripped as a path parameter
PATH_ESCAPED_QUESTION = 8  # "%3F": decoded, it starts a query the gateway never saw
PATH_ESCAPED_HASH = 16  # "%23": decoded, it cuts the path

_ESCAPE_FLAGS = (
    ("%25", PATH_ESCAPED_PERCENT),
    ("%3B", PATH_ESCAPED_SEMICOLON),
    ("%3F", PATH_ESCAPED_QUESTION),
    ("%23", PATH_ESCAPED_HASH),
)

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = "0123456789abcdefABCDEF"
#: percent-escapes refused outright: "/" and "\\" would re-split the path upstream, NUL
#: truncates it in C upstreams
_REFUSED_ESCAPES = {0x2F: "%2F (encoded '/')", 0x5C: "%5C (encoded '\\')", 0x00: "%00 (NUL)"}
_ABSOLUTE_SCHEMES = ("http://", "https://")


def _escape_table() -> dict[str, str]:
    """Every two-hex-digit pair -> its replacement; refused pairs are absent.

    One dict lookup both validates and decodes, and avoids int(..., 16), which would accept
    "+f" or " f".
    """
    table: dict[str, str] = {}
    for high in _HEX:
        for low in _HEX:
            pair = high + low
            code = int(pair, 16)
            if code not in _REFUSED_ESCAPES:
                char = chr(code)
                table[pair] = char if char in _UNRESERVED else "%" + pair.upper()
    return table


_ESCAPES = _escape_table()


def normalize_target(target: bytes) -> tuple[str, str]:
    """Split and normalize a request-target into (path, query); query has no leading "?"."""
    path, query, _, _ = split_target(target)
    return path, query


#: `split_target`'s answers by target: clients repeat their paths (a health check, an API's
#: few endpoints), and a lookup (~200 instructions, callgrind) costs less than the scans
#: (~1.5k for "/").  Bounded in entries and in the targets it keeps (at most ~1 MiB), and
#: emptied when full: targets that never repeat cost a lookup and an insert each.
_SPLIT: Final[dict[bytes, tuple[str, str, bool, int]]] = {}
_SPLIT_ENTRIES: Final = 1024
_SPLIT_TARGET_BYTES: Final = 256


def split_target(target: bytes) -> tuple[str, str, bool, int]:
    """`normalize_target`, whether `target` was already normal (so it can be forwarded as
    received, without re-encoding), and the PATH_* flags of the normalized path."""
    known = _SPLIT.get(target)
    if known is not None:
        return known
    split = _split_target(target)
    if len(target) <= _SPLIT_TARGET_BYTES:
        if len(_SPLIT) >= _SPLIT_ENTRIES:
            _SPLIT.clear()
        _SPLIT[target] = split
    return split


def _split_target(target: bytes) -> tuple[str, str, bool, int]:
    # latin-1 maps bytes to code points one to one, so nothing is lost before validation
    path, _, query = target.decode("latin-1").partition("?")
    if (
        path.isascii()
        and path.isprintable()
        and path
        and path[0] == "/"
        and " " not in path
        and "%" not in path
        and "\\" not in path
        and "#" not in path
        and "//" not in path
        and "/." not in path
        and ";" not in path
        and (not query or (query.isascii() and query.isprintable() and " " not in query))
    ):
        return path, query, True, 0
    path, query = _normalize_slow(path, query)
    return path, query, False, _path_flags(path)


def _path_flags(path: str) -> int:
    """The PATH_* flags of a normalized path (escapes are upper-case by then)."""
    flags = PATH_SEMICOLON if ";" in path else 0
    if "%" in path:
        for escape, flag in _ESCAPE_FLAGS:
            if escape in path:
                flags |= flag
    return flags


def _normalize_slow(path: str, query: str) -> tuple[str, str]:
    if path[:1] != "/":
        path = _path_of_absolute_form(path)
    _check_printable(path, "request path", forbidden=" \\#")
    _check_printable(query, "query string", forbidden=" ")
    if "%" in path:
        path = _decode_unreserved(path)
    if ";" in path:
        _refuse_dot_parameters(path)
    return _remove_dot_segments(path), query


def _refuse_dot_parameters(path: str) -> None:
    """`..;x` is `..` to Tomcat and Spring, which strip `;params` before resolving dot segments:
    refused always, even on a route that allows `;` (it names no resource of its own)."""
    for segment in path.split("/"):
        if segment.partition(";")[0] in (".", ".."):
            raise BadRequest("a dot segment with ';' parameters in the request path")


def _path_of_absolute_form(target: str) -> str:
    """The path of "http://authority/path"; the authority is ignored (Host decides routing)."""
    if not target:
        raise BadRequest("empty request target")
    if target == "*":
        raise BadRequest("asterisk-form request target (OPTIONS *) is not supported")
    head = target[:8].lower()
    for scheme in _ABSOLUTE_SCHEMES:
        if head.startswith(scheme):
            rest = target[len(scheme) :]
            slash = rest.find("/")
            authority = rest if slash < 0 else rest[:slash]
            if not authority:
                raise BadRequest("empty authority in absolute-form request target")
            _check_printable(authority, "request target authority", forbidden=" \\#")
            return "/" if slash < 0 else rest[slash:]
    raise BadRequest("request target must be an absolute path or an absolute http(s) URI")


def _check_printable(text: str, where: str, *, forbidden: str) -> None:
    """Refuse anything but printable ASCII, and the characters in `forbidden`."""
    if text.isascii() and text.isprintable() and not any(c in text for c in forbidden):
        return
    bad = next(c for c in text if not (" " < c < "\x7f") or c in forbidden)
    raise BadRequest(f"{_describe(bad)} in the {where}")


def _describe(char: str) -> str:
    if char == "\x00":
        return "NUL byte"
    if char == "\\":
        return "backslash"
    if char == "#":
        return "fragment ('#')"
    if char > "\x7f":
        return "non-ASCII byte (must be percent-encoded)"
    return f"control character or space (0x{ord(char):02X})"


def _decode_unreserved(path: str) -> str:
    """Decode escapes of unreserved characters, upper-case the others, refuse invalid ones."""
    parts = path.split("%")
    out = [parts[0]]
    escapes = _ESCAPES
    for part in parts[1:]:
        pair = part[:2]
        replacement = escapes.get(pair)
        if replacement is None:
            raise BadRequest(_describe_bad_escape(pair))
        out.append(replacement)
        out.append(part[2:])
    return "".join(out)


def _describe_bad_escape(pair: str) -> str:
    if len(pair) == 2 and pair[0] in _HEX and pair[1] in _HEX:
        return f"{_REFUSED_ESCAPES[int(pair, 16)]} in the request path"
    return f"invalid percent-encoding '%{pair}' in the request path"


def _remove_dot_segments(path: str) -> str:
    """Merge repeated slashes and resolve "." and ".."; a trailing slash is kept.

    Unlike RFC 3986, ".." above the root is refused rather than clamped: a client that sends it
    is probing, and clamping would make one more spelling of "/".
    """
    segments = path.split("/")
    out: list[str] = []
    for segment in segments[1:-1]:
        if segment == "..":
            _pop_parent(out)
        elif segment and segment != ".":
            out.append(segment)
    last = segments[-1]
    if last == "..":
        _pop_parent(out)
    elif last and last != ".":
        out.append(last)
        return "/" + "/".join(out)
    # the path ends in "/", "/." or "/..": it names a directory, so it keeps its trailing slash
    return ("/" + "/".join(out) + "/") if out else "/"


def _pop_parent(segments: list[str]) -> None:
    if not segments:
        raise BadRequest("'..' above the root in the request path")
    segments.pop()
