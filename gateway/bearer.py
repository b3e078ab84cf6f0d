"""Bearer credentials in an Authorization value, read one way everywhere (jwt stage, admin API).

`Authorization: <scheme> 1*SP <token68>` (RFC 9110 §11.4, RFC 6750 §2.1).  The scheme is matched
in any case (RFC 9110 §11.1); the token is taken exactly as sent — never trimmed, unescaped or
otherwise normalized — so the string a caller compares or caches is the one on the wire.
Anything that is not exactly this form, including any byte outside ASCII, gives None: a caller
answers 401, never an encoding error.
"""

from __future__ import annotations

import re
from typing import Final

# re.ASCII: a case-insensitive match must not fold non-ASCII look-alikes into the scheme
_BEARER: Final = re.compile(r"(?i:bearer) +([A-Za-z0-9\-._~+/]+=*)", re.ASCII)
_SCHEME: Final = re.compile(r"(?i:bearer)(?:[ \t]|\Z)", re.ASCII)


def bearer_token(authorization: str | None) -> str | None:
    """The token68 of a `Bearer` credential, or None for anything else."""
    if authorization is None:
        return None
    match = _BEARER.fullmatch(authorization)
    return match.group(1) if match is not None else None


def names_bearer(authorization: str) -> bool:
    """Whether the value uses the Bearer scheme at all, so that when `bearer_token` finds no
    token the credentials are garbled rather than absent (RFC 6750 §3.1 tells them apart)."""
    return _SCHEME.match(authorization) is not None
