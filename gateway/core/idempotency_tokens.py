"""Signed idempotency tokens (SPEC §5.5): `v1.<unix_ms>.<salt>.<signature>`.

The signature is the unpadded base64url HMAC-SHA256, under the stage's secret, of
`v1.<client_id>.<unix_ms>.<salt>`: a token names the moment it was minted and a random salt,
and is bound to one client identity, so a token leaked from one client is worthless to another
and an old one is refused.  Signatures are compared in constant time.  The client id is not in
the token (the gateway knows it from the JWT, the certificate or a header), which also keeps it
out of logs that record keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import time
from typing import Final

VERSION: Final = "v1"
_TOKEN: Final = re.compile(r"^v1\.(\d{1,16})\.([A-Za-z0-9_-]{8,64})\.([A-Za-z0-9_-]{43})$")


class TokenInvalid(Exception):
    """A token that is malformed, forged, for another client, or outside the window."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.expired = expired


def _signature(secret: bytes, client_id: str, unix_ms: str, salt: str) -> str:
    message = f"{VERSION}.{client_id}.{unix_ms}.{salt}".encode()
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def mint_token(
    secret: str | bytes,
    client_id: str,
    *,
    unix_ms: int | None = None,
    salt: str | None = None,
) -> str:
    """A token for `client_id`, minted now (or at `unix_ms`) with a random (or given) salt."""
    key = secret.encode() if isinstance(secret, str) else secret
    ms = str(int(time.time() * 1000) if unix_ms is None else unix_ms)
    salt = salt or base64.urlsafe_b64encode(os.urandom(12)).rstrip(b"=").decode("ascii")
    token = f"{VERSION}.{ms}.{salt}.{_signature(key, client_id, ms, salt)}"
    if not _TOKEN.match(token):
        raise ValueError("the salt must be 8-64 characters of A-Z a-z 0-9 _ -")
    return token


def verify_token(
    token: str,
    secret: str | bytes,
    client_id: str,
    *,
    window: float,
    now: float | None = None,
) -> int:
    """The token's minting time (unix ms) when it is authentic for `client_id` and within
    ±`window` seconds of `now`; else `TokenInvalid`."""
    match = _TOKEN.match(token)
    if match is None:
        raise TokenInvalid("the key is not a v1 idempotency token")
    ms, salt, given = match.groups()
    key = secret.encode() if isinstance(secret, str) else secret
    expected = _signature(key, client_id, ms, salt)
    # constant time: a forger learns nothing from how long the refusal took
    if not hmac.compare_digest(expected.encode("ascii"), given.encode("ascii")):
        raise TokenInvalid("the key's signature does not match")
    minted = int(ms)
    current = time.time() if now is None else now
    if abs(current * 1000 - minted) > window * 1000:
        raise TokenInvalid(
            f"the key expired: it was minted more than {window:g} s from now", expired=True
        )
    return minted
