"""JSON Web Tokens: keys from a JWKS or a secret, and verification with explicit algorithms.

Pure and synchronous: a token, the keys and `now` in, claims or a `TokenRejected` out.  The
cryptography is pyjwt's — the library our users check their own tokens with: `jwt.PyJWK` builds
each key from its JWK, and pyjwt's algorithm object for the token's `alg` (the one
`jwt.decode` would use) checks the signature under one key.  We split and decode the compact
form ourselves, once, after checking it is canonical: pyjwt's own parsing would read every
segment again character by character in Python, which more than tripled what rejecting a forged
token costs (17 → 57 µs for HS256) — work an attacker decides the amount of.  Our policy sits on
top, and wins wherever pyjwt would decide differently:

- Spelling: a token must be three segments of canonical unpadded base64url (`is_compact_jws`).
  pyjwt accepts `=` padding (and older releases translate `+`/`/` and drop stray characters), so
  one token could be spelled many ways; we accept only the one spelling an encoder writes.
- Algorithms come from the configuration, never the token: `alg` must be one of them, `none` can
  never be configured (nor is it registered with our `PyJWS`), and pyjwt is handed only the
  token's `alg` after our checks.
- Key families: each key verifies only algorithms of its own family — RSA, one EC curve
  (ES256 needs P-256, never P-384), Ed25519, or an HMAC secret — narrowed to the JWK's own `alg`
  when it names one.  So a public key can never be an HMAC secret (the RS256/HS256 confusion)
  and an HMAC stage never holds public keys.  pyjwt 2.15 also matches an EC key's curve to `alg`;
  we do not rely on it.
- Keys: a `kid` selects the key; without one, only a set of exactly one key for that `alg` is
  tried.  Keys embedded in a token (`jwk`, `jku`, `x5u`, `x5c`) are never used.
- Unusable JWKs are skipped one by one with a bounded reason, and the rest of the set works.
  `PyJWKSet` would drop some silently and keep others we refuse: RSA under 2048 bits, secp256k1,
  private keys, `use: enc` keys, symmetric keys published in a JWKS.
- Key length: pyjwt only warns about short keys unless told to refuse them.  We refuse them when
  the keys are read (RSA under 2048 bits, an HMAC secret shorter than its hash, RFC 7518 §3.2) and
  still run pyjwt with `enforce_minimum_key_length`, so a warning can never reach the request path.
- `crit`: refused whatever it lists (pyjwt accepts RFC 7797's `b64`, a detached payload).
- Claims are ours, not pyjwt's: pyjwt refuses a future `iat`, refuses any `aud` when no audience
  is configured, reads `exp`/`nbf` with `int()` (strings, booleans, truncated floats), takes an
  issuer from a list, wants `sub`/`jti` to be strings and calls a null claim missing.  We check,
  after the signature: `exp` and `nbf` as finite JSON numbers with `leeway`, `iss` equal to the
  one configured, `aud` (a string or a list) holding one of the configured audiences when any
  are, and each required claim present.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from cryptography.hazmat.primitives.asymmetric import rsa
from jwt import PyJWK
from jwt.api_jws import PyJWS
from jwt.exceptions import InvalidKeyError

HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
ALGORITHMS: Final = HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS

#: what a key of each family may verify
_FAMILY_ALGORITHMS: Final[Mapping[str, frozenset[str]]] = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "EC:P-256": frozenset({"ES256"}),
    "EC:P-384": frozenset({"ES384"}),
    "EC:P-521": frozenset({"ES512"}),
    "OKP:Ed25519": frozenset({"EdDSA"}),
    "HMAC": HMAC_ALGORITHMS,
}
#: the algorithm pyjwt is told to read a JWK of each family with (any of the family's would do)
_READER_ALGORITHM: Final = {
    "RSA": "RS256",
    "EC:P-256": "ES256",
    "EC:P-384": "ES384",
    "EC:P-521": "ES512",
    "OKP:Ed25519": "EdDSA",
}
#: the public members each key type needs, all base64url
_PUBLIC_MEMBERS: Final = {"RSA": ("n", "e"), "EC": ("x", "y"), "OKP": ("x",)}
_PRIVATE_MEMBERS: Final = ("d", "p", "q", "dp", "dq", "qi", "oth")
_MIN_RSA_BITS: Final = 2048
#: RFC 7518 §3.2: an HMAC key at least as long as the hash output
_HMAC_MIN_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}

#: pyjwt's algorithm objects, only ours ("none" is not among them); key lengths are refused
#: when keys are read (RSA under 2048 bits, HMAC secrets shorter than their hash)
_JWS: Final = PyJWS(algorithms=sorted(ALGORITHMS))
_VERIFIERS: Final = {name: _JWS.get_algorithm_by_name(name) for name in sorted(ALGORITHMS)}

#: why a JWK was left out; a bounded set, used as a metric label
SkipReason = Literal["malformed", "unsupported", "weak", "symmetric", "private", "not_for_signing"]


class TokenRejected(Exception):
    """A token that does not authenticate; `reason` is safe to show the client."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.expired = expired


class JwksProblem(Exception):
    """A JWKS or secret that cannot be used (a configuration problem)."""


# -- spelling --------------------------------------------------------------------------------

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
    accept only the one spelling an encoder writes, so a misspelling can never find the cache of
    verified tokens (keyed by the string).  The encoding is canonical, not the signature: an
    ECDSA signature (r, s) also verifies as (r, n - s), so one set of ES* claims has two token
    strings — which matters only to a list keyed by token string, and we keep none.
    """
    parts = token.split(".")
    return len(parts) == 3 and all(map(_is_canonical_b64url, parts))


def _is_b64url_member(value: object) -> bool:
    """A JWK member fit to decode: base64url, padding tolerated (it is our issuer's key, not a
    token, so only garbage matters here, not its spelling)."""
    if not isinstance(value, str):
        return False
    text = value.rstrip("=")
    return bool(text) and len(value) - len(text) <= 2 and _B64URL.issuperset(text)


# -- keys ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyingKey:
    kid: str | None
    #: "RSA", "EC:P-256" …, "OKP:Ed25519" or "HMAC"
    family: str
    #: a cryptography public key, or an HMAC secret's bytes
    key: Any
    #: what it may verify: its family's algorithms, narrowed to its JWK's `alg` if that names one
    algorithms: frozenset[str]

    def accepts(self, alg: str) -> bool:
        return alg in self.algorithms


@dataclass(frozen=True, slots=True)
class SkippedKey:
    """A JWK that cannot verify tokens.  `detail` is our own wording: never key material."""

    kid: str | None
    reason: SkipReason
    detail: str

    def __str__(self) -> str:
        named = "a key without kid" if self.kid is None else _shown(self.kid)
        return f"{named} ({self.reason}: {self.detail})"


@dataclass(frozen=True, slots=True)
class KeySet:
    """What a JWKS holds: the keys that can verify, and the entries left out."""

    keys: tuple[VerifyingKey, ...]
    skipped: tuple[SkippedKey, ...]

    def usable_for(self, algorithms: Collection[str]) -> tuple[VerifyingKey, ...]:
        return tuple(k for k in self.keys if not k.algorithms.isdisjoint(algorithms))

    def no_key_problem(self, algorithms: Collection[str]) -> str:
        """Why the set has nothing for `algorithms`, for an error message or `last_error`."""
        text = f"the JWKS holds no usable signature key for {', '.join(sorted(algorithms))}"
        if self.keys:
            text += f" ({len(self.keys)} for other algorithms)"
        if self.skipped:
            text += "; skipped: " + "; ".join(map(str, self.skipped))
        return text


def _shown(value: object) -> str:
    """A value from a JWKS in a message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _family(jwk: Mapping[str, Any]) -> str | None:
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        return "RSA"
    if kty == "EC" and crv in ("P-256", "P-384", "P-521"):
        return f"EC:{crv}"
    if kty == "OKP" and crv == "Ed25519":
        return "OKP:Ed25519"
    return None


def _unwanted(jwk: Mapping[str, Any]) -> tuple[SkipReason, str] | None:
    """Why a JWK is not meant for verifying our signatures at all; None if it may be."""
    use, ops = jwk.get("use"), jwk.get("key_ops")
    if use not in (None, "sig") or (
        ops is not None and (not isinstance(ops, list) or "verify" not in ops)
    ):
        return "not_for_signing", "its use/key_ops do not include verifying signatures"
    if jwk.get("kty") == "oct":
        return "symmetric", "a symmetric (oct) key does not belong in a JWKS; use `secret`"
    return None


def _unfit(jwk: Mapping[str, Any], family: str) -> tuple[SkipReason, str] | None:
    """Why a JWK of a family we verify with is still no key for us; None if it is one."""
    if any(name in jwk for name in _PRIVATE_MEMBERS):
        return "private", "it holds private key material; a JWKS publishes public keys"
    alg = jwk.get("alg")
    if alg is not None and (not isinstance(alg, str) or alg not in _FAMILY_ALGORITHMS[family]):
        return "unsupported", f"alg {_shown(alg)} is not one a {family} key verifies"
    for name in _PUBLIC_MEMBERS[family.partition(":")[0]]:
        if not _is_b64url_member(jwk.get(name)):
            return "malformed", f"member {name!r} is missing or not base64url"
    return None


def _read_key(entry: object) -> VerifyingKey | SkippedKey:
    if not isinstance(entry, dict):
        return SkippedKey(None, "malformed", "not a JSON object")
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        return SkippedKey(None, "malformed", "its kid is not a string")
    why = _unwanted(entry)
    if why is not None:
        return SkippedKey(kid, *why)
    family = _family(entry)
    if family is None:
        curve = f" on curve {_shown(entry.get('crv'))}" if "crv" in entry else ""
        detail = f"key type {_shown(entry.get('kty'))}{curve} is not one we verify with"
        return SkippedKey(kid, "unsupported", detail)
    why = _unfit(entry, family)
    if why is not None:
        return SkippedKey(kid, *why)
    named = entry.get("alg")
    try:
        # pyjwt picks its JWK reader by algorithm; every algorithm of a family reads the same key
        key = PyJWK(entry, algorithm=named or _READER_ALGORITHM[family]).key
    except Exception:
        # whatever pyjwt or cryptography make of a hostile entry, it costs that entry only (a
        # fetch task that died here would never refresh again); their messages quote the whole
        # JWK, so they are never passed on
        return SkippedKey(kid, "malformed", f"not a valid {family} public key")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < _MIN_RSA_BITS:
        detail = f"an RSA key of {key.key_size} bits, under {_MIN_RSA_BITS}"
        return SkippedKey(kid, "weak", detail)
    allowed = _FAMILY_ALGORITHMS[family] if named is None else frozenset({named})
    return VerifyingKey(kid, family, key, allowed)


def read_jwks(document: bytes) -> KeySet:
    """The keys of a JWKS document, each unusable entry skipped with its reason.

    Raises `JwksProblem` only when the document is not a JWKS at all; a set whose every key was
    skipped is an empty `KeySet`, for the caller to judge (`usable_for`, `no_key_problem`).
    """
    try:
        data = json.loads(document)
    except (ValueError, RecursionError) as exc:
        raise JwksProblem(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksProblem('a JWKS is {"keys": [...]}')
    keys: list[VerifyingKey] = []
    skipped: list[SkippedKey] = []
    for entry in data["keys"]:
        read = _read_key(entry)
        if isinstance(read, VerifyingKey):
            keys.append(read)
        else:
            skipped.append(read)
    return KeySet(tuple(keys), tuple(skipped))


def hmac_key(secret: str, algorithms: Collection[str]) -> VerifyingKey:
    """The key for a `secret`, for the HS* algorithms among `algorithms`."""
    raw = secret.encode()
    hs = sorted(a for a in algorithms if a in HMAC_ALGORITHMS) or ["HS256"]
    strongest = max(hs, key=_HMAC_MIN_BYTES.__getitem__)
    if len(raw) < _HMAC_MIN_BYTES[strongest]:
        need = _HMAC_MIN_BYTES[strongest]
        raise JwksProblem(f"an HMAC secret must be at least {need} bytes for {strongest}")
    try:
        # pyjwt refuses, on every verification, a secret that looks like a PEM/DER key or a
        # JWK; say so once, at load
        _JWS.get_algorithm_by_name(strongest).prepare_key(raw)
    except InvalidKeyError:
        raise JwksProblem("the secret looks like a public key or a JWK, not a secret") from None
    return VerifyingKey(None, "HMAC", raw, frozenset(hs))


# -- tokens ----------------------------------------------------------------------------------


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
    header = _header(token)
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in policy.algorithms:
        raise TokenRejected("algorithm not allowed")
    if "crit" in header:
        raise TokenRejected("unsupported critical header")
    if "b64" in header:
        # RFC 7797's unencoded payload: another signing input; nobody issues it for access
        raise TokenRejected("malformed token")
    key = _select_key(keys, alg, header.get("kid"))
    claims = _signed_claims(token, key, alg)
    _check_claims(claims, policy, now)
    return claims


def _header(token: str) -> dict[str, Any]:
    # canonical base64url already (is_compact_jws): only its JSON can be wrong
    return _json_object(_b64decode(token[: token.index(".")]))


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):  # JSON and UTF-8 errors are ValueErrors
        raise TokenRejected("malformed token") from None
    if not isinstance(value, dict):
        raise TokenRejected("malformed token")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object with each name once: `{"sub":"alice","sub":"admin"}` is refused, since we
    would read the last and an upstream re-parsing the token perhaps the first."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member name")
    return result


def _select_key(keys: Sequence[VerifyingKey], alg: str, kid: object) -> VerifyingKey:
    candidates = [k for k in keys if k.accepts(alg)]
    if kid is None:
        if len(candidates) != 1:
            raise TokenRejected("token names no key id")
        return candidates[0]
    if not isinstance(kid, str):
        raise TokenRejected("malformed token")
    for key in candidates:
        if key.kid == kid:
            return key
    raise TokenRejected("unknown key id")


def _signed_claims(token: str, key: VerifyingKey, alg: str) -> dict[str, Any]:
    # canonical base64url already (is_compact_jws): the segments decode, and decode to one value
    signed_end = token.rindex(".")
    payload = token[token.index(".") + 1 : signed_end]
    try:
        authentic = _VERIFIERS[alg].verify(
            token[:signed_end].encode("ascii"), key.key, _b64decode(token[signed_end + 1 :])
        )
    except (InvalidKeyError, ValueError, TypeError):
        # unreachable by construction (families and lengths are checked when keys are read);
        # if pyjwt ever disagrees with them, the token is refused, never let through
        authentic = False
    if not authentic:
        raise TokenRejected("invalid signature")
    return _json_object(_b64decode(payload))


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenRejected(f"claim {name} is not a number")
    try:
        number = float(value)  # a JSON integer of 400 digits is no float: OverflowError
    except OverflowError:
        raise TokenRejected(f"claim {name} is not a number") from None
    if not math.isfinite(number):
        raise TokenRejected(f"claim {name} is not a number")
    return number


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
