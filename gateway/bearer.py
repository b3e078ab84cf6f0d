"""Bearer credentials in an Authorization value, read one way everywhere (jwt stage, admin API).

`Authorization: <scheme> 1*SP <token68>` (RFC 9110 §11.4, RFC 6750 §2.1).  The scheme is matched
in any case (RFC 9110 §11.1); the token is taken exactly as sent — never trimmed, unescaped or
otherwise normalized — so the string a caller compares or caches is the one on the wire.
Anything that is not exactly this form, including any byte outside ASCII, gives None: a caller
answers 401, never an encoding error.

`bearer_credentials` is the cheap half (no pass over the token's characters) for a caller that
checks them more strictly itself: the jwt stage, whose tokens must be canonical base64url, a
subset of token68.  Everything else takes `bearer_token`.
"""

from __future__ import annotations

import re
from typing import Final

_TOKEN68: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*", re.ASCII)
_SCHEME: Final = "bearer"


def bearer_credentials(authorization: str | None) -> str | None:
    """What follows `Bearer` (any case) and its spaces, characters not checked; None when the
    value is not of that form or nothing follows."""
    if authorization is None:
        return None
    if authorization.startswith("Bearer "):
        # the spelling nearly every client sends, without the slices and the case folding the
        # general test below costs (a jwt stage runs this on every request)
        return authorization[7:].lstrip(" ") or None
    scheme = authorization[:6]
    # isascii: lower() must not fold a non-ASCII look-alike into the scheme
    if not (scheme.isascii() and scheme.lower() == _SCHEME and authorization[6:7] == " "):
        return None
    return authorization[7:].lstrip(" ") or None


def bearer_token(authorization: str | None) -> str | None:
    """The token68 of a `Bearer` credential, or None for anything else."""
    credentials = bearer_credentials(authorization)
    if credentials is None or _TOKEN68.fullmatch(credentials) is None:
        return None
    return credentials


def names_bearer(authorization: str) -> bool:
    """Whether the value uses the Bearer scheme at all, so that when no token comes out of it
    the credentials are garbled rather than absent (RFC 6750 §3.1 tells them apart)."""
    scheme = authorization[:6]
    return scheme.isascii() and scheme.lower() == _SCHEME and authorization[6:7] in ("", " ", "\t")
