"""JSON Web Tokens: keys from a JWKS or a secret, and verification with explicit algorithms.

Pure and synchronous: a token, the keys and `now` in, claims or a `TokenRejected` out.  The
defences are structural rather than checks bolted on:
- the algorithm list is the configuration's, never the token's: `alg` must be one of them, and
  `none` can never be configured;
- each key knows its family (RSA, EC curve, OKP, or an HMAC secret) and verifies only
  algorithms of that family, so a public key can never be used as an HMAC secret
  (the RS256/HS256 "key confusion" attack) and an HMAC route never holds public keys;
- a `kid` in the token selects the key; without one, only a key set of exactly one usable key is
  tried;
- `exp`, `nbf`, `iss`, `aud` and required claims are checked after the signature, with `leeway`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
ALGORITHMS: Final = HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS


def _hash(bits: str) -> hashes.HashAlgorithm:
    if bits == "256":
        return hashes.SHA256()
    return hashes.SHA384() if bits == "384" else hashes.SHA512()


_HMAC_HASHES: Final = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
_EC_CURVES: Final = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_CURVE_SIZES: Final = {"P-256": 32, "P-384": 48, "P-521": 66}
_CURVE_CLASSES: Final[dict[str, type[ec.EllipticCurve]]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}


class TokenRejected(Exception):
    """A token that does not authenticate; `reason` is safe to show the client."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.expired = expired


class JwksProblem(Exception):
    """A JWKS or secret that cannot be used (a configuration problem)."""


def b64url_decode(text: str) -> bytes:
    if not text or "=" in text:
        raise ValueError("not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_B64URL_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64URL: Final = frozenset(_B64URL_ALPHABET)
#: the last character of a segment 4k+2 long carries 2 bits and 4 unused ones, which canonical
#: base64url leaves zero: only every 16th character of the alphabet ends such a segment
_LAST_OF_2: Final = frozenset(_B64URL_ALPHABET[::16])
#: ... and of a segment 4k+3 long, 4 bits and 2 unused: every 4th character
_LAST_OF_3: Final = frozenset(_B64URL_ALPHABET[::4])


def _is_canonical_b64url(segment: str) -> bool:
    rest = len(segment) % 4
    if rest == 1 or not _B64URL.issuperset(segment):
        return False
    return rest == 0 or segment[-1] in (_LAST_OF_2 if rest == 2 else _LAST_OF_3)


def is_compact_jws(token: str) -> bool:
    """Whether `token` is three segments of canonical unpadded base64url (RFC 7515 §7.1).

    Lenient decoders (the standard library's, pyjwt's) translate `+`/`/`, drop whitespace and
    padding and ignore a last character's unused bits, so many strings decode to one token.  We
    accept only the one spelling an encoder writes: the token string is then the token, which is
    what lets the cache of verified tokens be keyed by it.
    """
    parts = token.split(".")
    return len(parts) == 3 and all(map(_is_canonical_b64url, parts))


@dataclass(frozen=True, slots=True)
class VerifyingKey:
    kid: str | None
    #: "RSA", "EC:P-256" …, "OKP:Ed25519" or "HMAC"
    family: str
    key: Any

    def accepts(self, alg: str) -> bool:
        if self.family == "HMAC":
            return alg in HMAC_ALGORITHMS
        if self.family == "RSA":
            return alg[:2] in ("RS", "PS")
        if self.family.startswith("EC:"):
            return _EC_CURVES.get(alg) == self.family[3:]
        return self.family == "OKP:Ed25519" and alg == "EdDSA"

    def verify(self, alg: str, signed: bytes, signature: bytes) -> bool:
        try:
            if self.family == "HMAC":
                expected = hmac.new(self.key, signed, _HMAC_HASHES[alg]).digest()
                return hmac.compare_digest(expected, signature)
            if self.family == "RSA":
                digest = _hash(alg[2:])
                pad: padding.AsymmetricPadding = (
                    padding.PKCS1v15()
                    if alg.startswith("RS")
                    else padding.PSS(padding.MGF1(digest), padding.PSS.DIGEST_LENGTH)
                )
                self.key.verify(signature, signed, pad, digest)
                return True
            if self.family.startswith("EC:"):
                size = _CURVE_SIZES[self.family[3:]]
                if len(signature) != 2 * size:
                    return False
                r = int.from_bytes(signature[:size], "big")
                s = int.from_bytes(signature[size:], "big")
                der = encode_dss_signature(r, s)
                self.key.verify(der, signed, ec.ECDSA(_hash(alg[2:])))
                return True
            self.key.verify(signature, signed)
            return True
        except InvalidSignature:
            return False


def _int(value: object) -> int:
    if not isinstance(value, str):
        raise JwksProblem("a key parameter is not a string")
    return int.from_bytes(b64url_decode(value), "big")


def key_from_jwk(jwk: Mapping[str, Any]) -> VerifyingKey | None:
    """A verifying key from one JWK; None for keys not meant for signatures."""
    if jwk.get("use") not in (None, "sig"):
        return None
    kid = jwk.get("kid")
    kid = str(kid) if kid is not None else None
    kty = jwk.get("kty")
    try:
        if kty == "RSA":
            public = rsa.RSAPublicNumbers(_int(jwk.get("e")), _int(jwk.get("n"))).public_key()
            if public.key_size < 2048:
                raise JwksProblem(f"RSA key {kid!r} is shorter than 2048 bits")
            return VerifyingKey(kid, "RSA", public)
        if kty == "EC":
            curve = str(jwk.get("crv"))
            if curve not in _CURVE_CLASSES:
                raise JwksProblem(f"EC key {kid!r} has an unsupported curve {curve!r}")
            numbers = ec.EllipticCurvePublicNumbers(
                _int(jwk.get("x")), _int(jwk.get("y")), _CURVE_CLASSES[curve]()
            )
            return VerifyingKey(kid, f"EC:{curve}", numbers.public_key())
        if kty == "OKP" and jwk.get("crv") == "Ed25519":
            raw = b64url_decode(str(jwk.get("x")))
            return VerifyingKey(kid, "OKP:Ed25519", ed25519.Ed25519PublicKey.from_public_bytes(raw))
    except (ValueError, binascii.Error) as exc:
        raise JwksProblem(f"key {kid!r} is malformed: {exc}") from None
    if kty == "oct":
        # a JWKS is for public keys: a shared secret published there is a mistake
        raise JwksProblem("symmetric (oct) keys do not belong in a JWKS; use `secret`")
    return None


def keys_from_jwks(document: bytes) -> list[VerifyingKey]:
    try:
        data = json.loads(document)
    except ValueError as exc:
        raise JwksProblem(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksProblem('a JWKS is {"keys": [...]}')
    keys = [k for k in (key_from_jwk(j) for j in data["keys"] if isinstance(j, dict)) if k]
    if not keys:
        raise JwksProblem("the JWKS holds no signature key")
    return keys


def hmac_key(secret: str) -> VerifyingKey:
    if len(secret.encode()) < 32:
        raise JwksProblem("an HMAC secret must be at least 32 bytes")
    return VerifyingKey(None, "HMAC", secret.encode())


@dataclass(frozen=True, slots=True)
class Policy:
    issuer: str | None
    audiences: tuple[str, ...]
    algorithms: frozenset[str]
    leeway: float
    required_claims: tuple[str, ...]


def verify(token: str, keys: Sequence[VerifyingKey], policy: Policy, now: float) -> dict[str, Any]:
    """The token's claims when it is authentic and valid now, else `TokenRejected`."""
    if not is_compact_jws(token):
        raise TokenRejected("malformed token")
    parts = token.split(".")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
    except (ValueError, binascii.Error):
        raise TokenRejected("malformed token") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise TokenRejected("malformed token")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in policy.algorithms:
        raise TokenRejected("algorithm not allowed")
    if "crit" in header:
        raise TokenRejected("unsupported critical header")
    kid = header.get("kid")
    candidates = [k for k in keys if k.accepts(alg)]
    if kid is not None:
        candidates = [k for k in candidates if k.kid == str(kid)]
        if not candidates:
            raise TokenRejected("unknown key id")
    elif len(candidates) != 1:
        raise TokenRejected("token names no key id")
    try:
        signature = b64url_decode(parts[2])
    except (ValueError, binascii.Error):
        raise TokenRejected("malformed token") from None
    signed = f"{parts[0]}.{parts[1]}".encode("ascii")
    if not candidates[0].verify(alg, signed, signature):
        raise TokenRejected("invalid signature")
    _check_claims(claims, policy, now)
    return claims


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenRejected(f"claim {name} is not a number")
    return float(value)


def _check_claims(claims: Mapping[str, Any], policy: Policy, now: float) -> None:
    exp = _number(claims, "exp")
    if exp is not None and now > exp + policy.leeway:
        raise TokenRejected("token expired", expired=True)
    nbf = _number(claims, "nbf")
    if nbf is not None and now < nbf - policy.leeway:
        raise TokenRejected("token not valid yet")
    if policy.issuer is not None and claims.get("iss") != policy.issuer:
        raise TokenRejected("wrong issuer")
    if policy.audiences:
        aud = claims.get("aud")
        given = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(a in policy.audiences for a in given if isinstance(a, str)):
            raise TokenRejected("wrong audience")
    for name in policy.required_claims:
        if name not in claims:
            raise TokenRejected(f"claim {name} is missing")
