"""JWT verification and the classic attacks on it; JWKS entries skipped one by one; where our
policy decides instead of pyjwt's defaults."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from gateway.core.jwt_tokens import (
    ALGORITHMS,
    JwksProblem,
    Policy,
    TokenRejected,
    VerifyingKey,
    hmac_key,
    is_compact_jws,
    read_jwks,
    verify,
)
from tests.support.tokens import (
    MISSPELLINGS,
    UNUSABLE_KEYS,
    URL_SAFE_FILLER,
    EcKey,
    RsaKey,
    b64,
    claims,
    jwks,
    key_material,
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
KEYS = read_jwks(jwks(RSA, EC)).keys


def _reject(
    tok: str, reason: str, policy: Policy = POLICY, keys: Sequence[VerifyingKey] = KEYS
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
    keys = [hmac_key(secret, {"HS256"})]
    assert verify(token(None, claims(), secret=secret.encode()), keys, policy, time.time())
    _reject(token(None, claims(), secret=b"t" * 32), "invalid signature", policy, keys)
    with pytest.raises(JwksProblem, match="at least 32 bytes"):
        hmac_key("short", {"HS256"})
    # RFC 7518 §3.2: as long as the hash output (pyjwt refuses shorter keys, as we ask it to)
    with pytest.raises(JwksProblem, match="at least 64 bytes for HS512"):
        hmac_key(secret, {"HS256", "HS512"})
    with pytest.raises(JwksProblem, match="looks like a public key"):
        hmac_key(RSA.public_pem().decode(), {"HS256"})


def test_jwks_problems() -> None:
    only_secret = read_jwks(b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    assert only_secret.keys == ()
    assert [s.reason for s in only_secret.skipped] == ["symmetric"]
    problem = only_secret.no_key_problem({"RS256"})
    assert "no usable signature key for RS256" in problem
    assert "symmetric" in problem
    for_encryption = read_jwks(b'{"keys": [{"kty": "RSA", "use": "enc", "n": "AQ", "e": "AQAB"}]}')
    assert [s.reason for s in for_encryption.skipped] == ["not_for_signing"]
    assert "(1 for other algorithms)" in read_jwks(jwks(EC)).no_key_problem({"RS256"})
    with pytest.raises(JwksProblem, match="not JSON"):
        read_jwks(b"{")
    with pytest.raises(JwksProblem, match="a JWKS is"):
        read_jwks(b'{"keys": {}}')
    assert "none" not in ALGORITHMS


@pytest.mark.parametrize(
    ("entry", "reason"),
    [pytest.param(e, r, id=i) for i, e, r in UNUSABLE_KEYS],
)
def test_an_unusable_key_is_skipped_and_the_rest_of_the_set_verifies(
    entry: object, reason: str
) -> None:
    keyset = read_jwks(jwks(entry, RSA))
    assert [k.kid for k in keyset.keys] == ["r1"]
    assert [s.reason for s in keyset.skipped] == [reason]
    assert verify(token(RSA, claims()), keyset.keys, POLICY, time.time())["sub"] == "alice"
    shown = repr(keyset.skipped) + read_jwks(jwks(entry)).no_key_problem(POLICY.algorithms)
    assert not [m for m in key_material(entry) if m in shown]


def test_without_a_kid_only_usable_keys_count() -> None:
    weak, good = next(e for i, e, _ in UNUSABLE_KEYS if i == "rsa-1024"), RSA.jwk()
    assert isinstance(weak, dict)
    anonymous = [{k: v for k, v in jwk.items() if k != "kid"} for jwk in (weak, good)]
    keys = read_jwks(jwks(*anonymous)).keys
    assert verify(token(RSA, claims(), kid=None), keys, POLICY, time.time())
    two = read_jwks(jwks(anonymous[1], {**RsaKey("other").jwk(), "kid": None})).keys
    _reject(token(RSA, claims(), kid=None), "token names no key id", keys=two)


def test_a_jwk_alg_narrows_its_key_to_that_algorithm() -> None:
    keys = read_jwks(jwks({**RSA.jwk(), "alg": "RS256"})).keys
    loose = Policy(None, (), frozenset({"RS256", "RS384"}), 30.0, ())
    assert verify(token(RSA, claims()), keys, loose, time.time())
    _reject(token(RSA, claims(), alg="RS384"), "unknown key id", loose, keys)


def test_an_es256_token_is_never_checked_with_a_p384_key() -> None:
    p384 = EcKey("p384", "P-384")
    keys = read_jwks(jwks(p384)).keys
    both = Policy(None, (), frozenset({"ES256", "ES384"}), 30.0, ())
    assert verify(token(p384, claims()), keys, both, time.time())  # its own alg, ES384
    _reject(token(p384, claims(), alg="ES256"), "unknown key id", both, keys)


def test_keys_embedded_in_a_token_are_never_used() -> None:
    mallory = EcKey("e1")
    forged = token(mallory, claims(), header={"jwk": mallory.jwk(), "jku": "https://evil.test"})
    _reject(forged, "invalid signature")


HEADERS = [
    ("crit-unknown", {"crit": ["exp"]}, "unsupported critical header"),
    ("crit-b64", {"crit": ["b64"], "b64": True}, "unsupported critical header"),
    ("b64-false", {"b64": False}, "malformed token"),
    ("kid-not-a-string", {"kid": 1}, "malformed token"),
]


@pytest.mark.parametrize(
    ("header", "reason"), [h[1:] for h in HEADERS], ids=[h[0] for h in HEADERS]
)
def test_header_parameters_we_refuse(header: dict[str, Any], reason: str) -> None:
    _reject(token(RSA, claims(), header=header), reason)


def test_deeply_nested_json_is_malformed_not_an_error() -> None:
    deep = b64(b"[" * 100_000 + b"]" * 100_000)
    _reject(f"{deep}.e30.AAAA", "malformed token")


NOW = int(time.time())
#: where pyjwt's own claim checks would decide otherwise, ours decide: (id, claims changed,
#: policy, our reason or None for accepted)
CLAIM_POLICY: list[tuple[str, dict[str, Any], Policy, str | None]] = [
    ("iat-in-the-future", {"iat": NOW + 3600}, POLICY, None),
    ("iat-not-a-number", {"iat": "yesterday"}, POLICY, None),
    (
        "aud-with-no-audience-configured",
        {"aud": "other"},
        Policy(None, (), POLICY.algorithms, 30.0, ()),
        None,
    ),
    ("aud-list-with-a-non-string", {"aud": [1, "api"]}, POLICY, None),
    ("sub-not-a-string", {"sub": 42}, POLICY, None),
    ("jti-not-a-string", {"jti": 7}, POLICY, None),
    ("required-claim-null", {"sub": None}, POLICY, None),
    ("exp-as-a-string", {"exp": str(NOW + 300)}, POLICY, "claim exp is not a number"),
    ("exp-as-a-boolean", {"exp": True}, POLICY, "claim exp is not a number"),
    ("exp-infinite", {"exp": float("inf")}, POLICY, "claim exp is not a number"),
    ("nbf-as-a-string", {"nbf": "0"}, POLICY, "claim nbf is not a number"),
    ("exp-a-fraction-inside-the-leeway", {"exp": NOW - 29.5}, POLICY, None),
    ("exp-a-fraction-past-the-leeway", {"exp": NOW - 30.5}, POLICY, "token expired"),
    ("iss-as-a-list", {"iss": ["https://idp.test"]}, POLICY, "wrong issuer"),
    ("iss-missing", {"iss": None}, POLICY, "wrong issuer"),
]


@pytest.mark.parametrize(
    ("changed", "policy", "reason"),
    [c[1:] for c in CLAIM_POLICY],
    ids=[c[0] for c in CLAIM_POLICY],
)
def test_claims_are_checked_by_our_policy(
    changed: dict[str, Any], policy: Policy, reason: str | None
) -> None:
    payload = {**claims(), **changed}
    payload = {k: v for k, v in payload.items() if v is not None or k == "sub"}
    tok = token(RSA, payload)
    if reason is None:
        assert verify(tok, KEYS, policy, NOW)["aud"] == payload["aud"]
    else:
        with pytest.raises(TokenRejected) as info:
            verify(tok, KEYS, policy, NOW)
        assert info.value.reason == reason


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


@pytest.mark.parametrize(
    "payload",
    [
        b'{"sub":"a","exp":1' + b"0" * 400 + b"}",
        b'{"sub":"a","exp":-1' + b"0" * 400 + b"}",
        b'{"sub":"a","nbf":1' + b"0" * 400 + b"}",
    ],
    ids=["huge-exp", "huge-negative-exp", "huge-nbf"],
)
def test_an_integer_no_float_can_hold_is_not_a_number(payload: bytes) -> None:
    """Found by probing: math.isfinite raised OverflowError on it (a 500)."""
    with pytest.raises(TokenRejected, match="is not a number"):
        _verify_hs256(b'{"alg":"HS256"}', payload)


def _verify_hs256(header: bytes, payload: bytes) -> dict[str, Any]:
    """`verify` of a token with exactly these header and payload bytes, HMAC-signed."""
    secret = b"s" * 32
    signed = f"{b64(header)}.{b64(payload)}"
    sig = b64(hmac.new(secret, signed.encode(), hashlib.sha256).digest())
    policy = Policy(None, (), frozenset({"HS256"}), 30.0, ())
    return verify(f"{signed}.{sig}", [hmac_key(secret.decode(), ["HS256"])], policy, time.time())


@pytest.mark.parametrize(
    ("header", "payload"),
    [
        (b'{"alg":"HS256","alg":"HS256"}', b'{"sub":"a"}'),
        (b'{"alg":"HS256"}', b'{"sub":"alice","sub":"admin"}'),
        (b'{"alg":"HS256"}', b'{"sub":"a","ctx":{"role":"u","role":"admin"}}'),
    ],
    ids=["header", "payload", "nested"],
)
def test_duplicate_member_names_are_malformed(header: bytes, payload: bytes) -> None:
    """We would read the last, an upstream re-parsing the token perhaps the first."""
    with pytest.raises(TokenRejected, match="malformed token"):
        _verify_hs256(header, payload)
