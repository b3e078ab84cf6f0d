"""Signing JWTs in tests: keys, JWKS documents, and tokens honest or forged."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.support.config_builder import gateway_yaml, route, upstream_to


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int(value: int) -> str:
    return b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


class RsaKey:
    alg = "RS256"

    def __init__(self, kid: str, bits: int = 2048) -> None:
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=bits)

    def jwk(self) -> dict[str, str]:
        n = self.private.public_key().public_numbers()
        return {"kty": "RSA", "kid": self.kid, "use": "sig", "n": _int(n.n), "e": _int(n.e)}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, signed: bytes) -> bytes:
        return self.private.sign(signed, padding.PKCS1v15(), hashes.SHA256())


#: JWK curve name -> (curve, coordinate bytes, hash, JWS alg)
_CURVES: dict[str, tuple[type[ec.EllipticCurve], int, type[hashes.HashAlgorithm], str]] = {
    "P-256": (ec.SECP256R1, 32, hashes.SHA256, "ES256"),
    "P-384": (ec.SECP384R1, 48, hashes.SHA384, "ES384"),
    "P-521": (ec.SECP521R1, 66, hashes.SHA512, "ES512"),
    "secp256k1": (ec.SECP256K1, 32, hashes.SHA256, "ES256K"),
}


class EcKey:
    def __init__(self, kid: str, curve: str = "P-256") -> None:
        self.kid = kid
        self.curve = curve
        cls, self._size, self._hash, self.alg = _CURVES[curve]
        self.private = ec.generate_private_key(cls())

    def jwk(self) -> dict[str, str]:
        n = self.private.public_key().public_numbers()
        x, y = n.x.to_bytes(self._size, "big"), n.y.to_bytes(self._size, "big")
        return {"kty": "EC", "kid": self.kid, "crv": self.curve, "x": b64(x), "y": b64(y)}

    def sign(self, signed: bytes) -> bytes:
        r, s = decode_dss_signature(self.private.sign(signed, ec.ECDSA(self._hash())))
        return r.to_bytes(self._size, "big") + s.to_bytes(self._size, "big")


def jwks(*keys: RsaKey | EcKey | dict[str, Any] | object) -> bytes:
    """A JWKS document; anything that is not one of our keys goes in as written (junk)."""
    entries = [k.jwk() if isinstance(k, RsaKey | EcKey) else k for k in keys]
    return json.dumps({"keys": entries}).encode()


def _unusable_keys() -> list[tuple[str, object, str]]:
    p256 = EcKey("p256").jwk()
    d = EcKey("priv").private.private_numbers().private_value.to_bytes(32, "big")
    ed = ed448.Ed448PrivateKey.generate().public_key()
    raw = ed.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return [
        ("rsa-1024", RsaKey("weak", bits=1024).jwk(), "weak"),
        ("ec-secp256k1", EcKey("k1", "secp256k1").jwk(), "unsupported"),
        ("oct", {"kty": "oct", "kid": "shared", "k": b64(b"x" * 32)}, "symmetric"),
        ("unknown-kty", {"kty": "PQC", "kid": "pq", "pub": "AAAA"}, "unsupported"),
        ("unknown-crv", {**p256, "kid": "p192", "crv": "P-192"}, "unsupported"),
        ("okp-ed448", {"kty": "OKP", "crv": "Ed448", "kid": "ed448", "x": b64(raw)}, "unsupported"),
        ("use-enc", {**p256, "kid": "enc", "use": "enc"}, "not_for_signing"),
        ("key-ops-encrypt", {**p256, "kid": "ops", "key_ops": ["encrypt"]}, "not_for_signing"),
        ("alg-of-another-family", {**p256, "kid": "fam", "alg": "RS256"}, "unsupported"),
        ("alg-none", {**p256, "kid": "nil", "alg": "none"}, "unsupported"),
        ("alg-not-a-string", {**p256, "kid": "list", "alg": ["ES256"]}, "unsupported"),
        ("crv-not-a-string", {**p256, "kid": "crv", "crv": ["P-256"]}, "unsupported"),
        ("private-key", {**p256, "kid": "priv", "d": b64(d)}, "private"),
        ("bad-base64", {"kty": "RSA", "kid": "b64", "n": "n+/=!", "e": "AQAB"}, "malformed"),
        ("n-not-a-string", {"kty": "RSA", "kid": "num", "n": 12345, "e": "AQAB"}, "malformed"),
        ("missing-n", {"kty": "RSA", "kid": "non", "e": "AQAB"}, "malformed"),
        ("missing-y", {k: v for k, v in p256.items() if k != "y"} | {"kid": "noy"}, "malformed"),
        ("point-off-curve", {**p256, "kid": "off", "y": b64(bytes(31) + b"\x01")}, "malformed"),
        ("short-coordinate", {**p256, "kid": "x31", "x": b64(bytes(31))}, "malformed"),
        ("kid-not-a-string", {**p256, "kid": 7}, "malformed"),
        ("not-an-object", "junk", "malformed"),
        ("null", None, "malformed"),
        ("array", [p256], "malformed"),
    ]


def key_material(entry: object) -> list[str]:
    """The long string members of a JWK (n, x, y, d, k …): what must never reach a log line."""
    values = entry.values() if isinstance(entry, dict) else []
    return [v for v in values if isinstance(v, str) and len(v) >= 16]


#: (id, JWKS entry, the reason it is skipped) — one of every kind of key a JWKS may hold that
#: cannot verify our tokens; none of them has the kid "good"
UNUSABLE_KEYS: list[tuple[str, object, str]] = _unusable_keys()


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": "https://idp.test",
        "aud": "api",
        "sub": "alice",
        "iat": now,
        "exp": now + 300,
    }
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def token(
    key: RsaKey | EcKey | None,
    payload: dict[str, Any],
    *,
    alg: str | None = None,
    kid: str | None = "default",
    secret: bytes | None = None,
    header: dict[str, Any] | None = None,
) -> str:
    """A compact JWT; `secret` signs with HMAC (alg HS256), `key` None with alg none;
    `header` adds (or overrides) header parameters."""
    if alg is None:
        alg = "HS256" if secret is not None else "none" if key is None else key.alg
    head: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid == "default" and key is not None:
        head["kid"] = key.kid
    elif kid not in (None, "default"):
        head["kid"] = kid
    head.update(header or {})
    signed = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(payload).encode())}"
    if secret is not None:
        signature = hmac.new(secret, signed.encode(), hashlib.sha256).digest()
    elif key is None:
        signature = b""
    else:
        signature = key.sign(signed.encode())
    return f"{signed}.{b64(signature)}"


# -- spellings of a token that decode to the same bytes ---------------------------------------
# Each returns a variant of a canonical compact JWS that a lenient base64url decoder reads as
# the same header, payload and signature.

#: a claim value whose base64url always holds "-" and "_" ("?>?" -> "Pz4_", ">?>" -> "Pj8-")
URL_SAFE_FILLER = "?>" * 12


def with_std_alphabet(tok: str) -> str:
    """'-' and '_' spelled as the standard alphabet's '+' and '/'."""
    variant = tok.translate(str.maketrans("-_", "+/"))
    assert variant != tok, "the token holds no '-' or '_': add URL_SAFE_FILLER to a claim"
    return variant


def with_padding(tok: str) -> str:
    """Each segment padded with '=' to a multiple of 4, as standard base64 writes it."""
    return ".".join(s + "=" * (-len(s) % 4) for s in tok.split("."))


def with_inner_space(tok: str, space: str = " ") -> str:
    """Four `space`s inserted in the middle of the signature (four, so that a decoder that drops
    whitespace finds the length, and so the padding, it expects)."""
    head, body, sig = tok.split(".")
    return f"{head}.{body}.{sig[:10]}{space * 4}{sig[10:]}"


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def with_noncanonical_tail(tok: str) -> str:
    """The signature's last character with an unused low bit set: the same bytes decode."""
    head, body, sig = tok.split(".")
    assert len(sig) % 4 in (2, 3), "the signature has no unused bits"
    last = _ALPHABET.index(sig[-1])
    assert last % 4 == 0  # canonical: the unused bits are zero
    return f"{head}.{body}.{sig[:-1]}{_ALPHABET[last | 1]}"


#: (id, misspell): spellings of a canonical token that a lenient decoder reads as the same
#: header, payload and signature, or that are not three segments at all; none may verify
MISSPELLINGS: list[tuple[str, Callable[[str], str]]] = [
    ("std-alphabet", with_std_alphabet),
    ("padded", with_padding),
    ("space-inside", with_inner_space),
    ("tab-inside", partial(with_inner_space, space="\t")),
    ("newline-inside", partial(with_inner_space, space="\n")),
    ("noncanonical-last-char", with_noncanonical_tail),
    ("four-segments", lambda tok: tok + ".e30"),
    ("two-segments", lambda tok: tok.rsplit(".", 1)[0]),
]


def jwt_config(
    source: Mapping[str, Any],
    *,
    upstream_port: int | None = None,
    after: Sequence[Mapping[str, Any]] = (),
) -> str:
    """A gateway config with one route, `api`, behind a jwt stage keyed by `source` (e.g.
    {"jwks_file": "/abs/jwks.json"}); to an upstream on 127.0.0.1 or, without one, the echo
    handler.  The stages `after` follow the jwt stage in the route's pipeline."""
    upstreams = None
    target = "internal:echo"
    if upstream_port is not None:
        upstreams = {"app": upstream_to(f"http://127.0.0.1:{upstream_port}")}
        target = "app"
    stage = {
        "issuer": "https://idp.test",
        "audiences": ["api"],
        "algorithms": ["RS256", "ES256"],
        **source,
        "forward_claims": {"sub": "X-User-Id", "scope": "X-Scope"},
    }
    return gateway_yaml(
        upstreams=upstreams, routes=[route("api", target, pipeline=[{"jwt": stage}, *after])]
    )
