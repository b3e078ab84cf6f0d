"""JWT verification and the classic attacks on it."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable

import pytest

from gateway.jwt import (
    ALGORITHMS,
    JwksProblem,
    Policy,
    TokenRejected,
    VerifyingKey,
    hmac_key,
    is_compact_jws,
    keys_from_jwks,
    verify,
)
from tests.support.tokens import (
    MISSPELLINGS,
    URL_SAFE_FILLER,
    EcKey,
    RsaKey,
    b64,
    claims,
    jwks,
    token,
)

POLICY = Policy(
    issuer="https://idp.test",
    audiences=("api",),
    algorithms=frozenset({"RS256", "ES256"}),
    leeway=30.0,
    required_claims=("sub",),
)
RSA = RsaKey("r1")
EC = EcKey("e1")
KEYS = keys_from_jwks(jwks(RSA, EC))


def _reject(
    tok: str, reason: str, policy: Policy = POLICY, keys: list[VerifyingKey] = KEYS
) -> None:
    with pytest.raises(TokenRejected) as info:
        verify(tok, keys, policy, time.time())
    assert info.value.reason == reason


def test_valid_rs256_and_es256() -> None:
    for key in (RSA, EC):
        got = verify(token(key, claims()), KEYS, POLICY, time.time())
        assert got["sub"] == "alice"


def test_alg_none_is_refused_even_unsigned() -> None:
    _reject(token(None, claims(), kid="r1"), "algorithm not allowed")
    _reject(token(None, claims(), alg="None", kid="r1"), "algorithm not allowed")


def test_rs_hs_key_confusion() -> None:
    """HS256 signed with the RSA public key as the secret: the classic confusion attack."""
    forged = token(None, claims(), secret=RSA.public_pem(), kid="r1")
    _reject(forged, "algorithm not allowed")
    # even with HS256 allowed, RSA keys never verify an HMAC algorithm
    loose = Policy(None, (), frozenset({"RS256", "HS256"}), 30.0, ())
    _reject(forged, "unknown key id", loose)


def test_expired_and_not_yet_valid_with_leeway() -> None:
    now = int(time.time())
    _reject(token(RSA, claims(exp=now - 31)), "token expired")
    assert verify(token(RSA, claims(exp=now - 20)), KEYS, POLICY, now)  # within leeway
    _reject(token(RSA, claims(nbf=now + 60)), "token not valid yet")


def test_wrong_audience_issuer_and_missing_claims() -> None:
    _reject(token(RSA, claims(aud="other")), "wrong audience")
    assert verify(token(RSA, claims(aud=["x", "api"])), KEYS, POLICY, time.time())
    _reject(token(RSA, claims(iss="https://evil.test")), "wrong issuer")
    _reject(token(RSA, claims(sub=None)), "claim sub is missing")


def test_unknown_kid_and_tampering() -> None:
    _reject(token(RSA, claims(), kid="r9"), "unknown key id")
    good = token(RSA, claims())
    head, body, sig = good.split(".")
    forged_body = b64(b'{"sub":"mallory","iss":"https://idp.test","aud":"api"}')
    _reject(f"{head}.{forged_body}.{sig}", "invalid signature")
    _reject(f"{head}.{body}.{sig[:-4]}AAAA", "invalid signature")
    _reject(f"{head}.{body}", "malformed token")
    _reject("a.b.c", "malformed token")


def test_a_key_of_the_wrong_curve_or_family_is_never_tried() -> None:
    other = EcKey("r1")  # an EC key claiming the RSA key's id
    _reject(token(other, claims()), "unknown key id")


def test_hmac_secrets() -> None:
    secret = "s" * 32
    policy = Policy(None, (), frozenset({"HS256"}), 0.0, ())
    keys = [hmac_key(secret)]
    assert verify(token(None, claims(), secret=secret.encode()), keys, policy, time.time())
    _reject(token(None, claims(), secret=b"t" * 32), "invalid signature", policy, keys)
    with pytest.raises(JwksProblem, match="at least 32 bytes"):
        hmac_key("short")


def test_jwks_problems() -> None:
    with pytest.raises(JwksProblem, match="symmetric"):
        keys_from_jwks(b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    with pytest.raises(JwksProblem, match="no signature key"):
        keys_from_jwks(b'{"keys": [{"kty": "RSA", "use": "enc", "n": "AQ", "e": "AQAB"}]}')
    with pytest.raises(JwksProblem, match="not JSON"):
        keys_from_jwks(b"{")
    assert "none" not in ALGORITHMS


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _reencodes_to_itself(segment: str) -> bool:
    """What canonical means: a lenient decode, encoded again, gives the segment back."""
    if len(segment) % 4 == 1:
        return False
    return b64(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))) == segment


def test_canonical_base64url_against_a_round_trip() -> None:
    # every 1- and 2-character segment, every last character after 2 and after 5 characters
    segments = [""] + list(_ALPHABET) + [a + b for a in _ALPHABET for b in _ALPHABET]
    segments += [f"{p}{c}" for p in ("Zm", "QUJDRE") for c in _ALPHABET]
    for segment in segments:
        expected = _reencodes_to_itself(segment)
        assert is_compact_jws(f"e30.{segment}.e30") is expected, segment
        assert is_compact_jws(f"{segment}.e30.{segment}") is expected, segment
    for junk in ("e30+", "e30/", "e30=", "e3 0", "e30\n", "é30", "e30."):
        assert not is_compact_jws(f"e30.{junk}.e30"), junk


@pytest.mark.parametrize("misspell", [m[1] for m in MISSPELLINGS], ids=[m[0] for m in MISSPELLINGS])
def test_a_misspelled_token_is_malformed(misspell: Callable[[str], str]) -> None:
    canonical = token(RSA, claims(note=URL_SAFE_FILLER))
    assert verify(canonical, KEYS, POLICY, time.time())["note"] == URL_SAFE_FILLER
    _reject(misspell(canonical), "malformed token")
