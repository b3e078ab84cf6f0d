"""Signing JWTs in tests: keys, JWKS documents, and tokens honest or forged."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int(value: int) -> str:
    return b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


class RsaKey:
    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict[str, str]:
        n = self.private.public_key().public_numbers()
        return {"kty": "RSA", "kid": self.kid, "use": "sig", "n": _int(n.n), "e": _int(n.e)}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, signed: bytes) -> bytes:
        return self.private.sign(signed, padding.PKCS1v15(), hashes.SHA256())


class EcKey:
    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.private = ec.generate_private_key(ec.SECP256R1())

    def jwk(self) -> dict[str, str]:
        n = self.private.public_key().public_numbers()
        x, y = n.x.to_bytes(32, "big"), n.y.to_bytes(32, "big")
        return {"kty": "EC", "kid": self.kid, "crv": "P-256", "x": b64(x), "y": b64(y)}

    def sign(self, signed: bytes) -> bytes:
        r, s = decode_dss_signature(self.private.sign(signed, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def jwks(*keys: RsaKey | EcKey) -> bytes:
    return json.dumps({"keys": [k.jwk() for k in keys]}).encode()


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
) -> str:
    """A compact JWT; `secret` signs with HMAC (alg HS256), `key` None with alg none."""
    if alg is None:
        alg = (
            "HS256"
            if secret is not None
            else "none"
            if key is None
            else ("RS256" if isinstance(key, RsaKey) else "ES256")
        )
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid == "default" and key is not None:
        header["kid"] = key.kid
    elif kid not in (None, "default"):
        header["kid"] = kid
    signed = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if secret is not None:
        signature = hmac.new(secret, signed.encode(), hashlib.sha256).digest()
    elif key is None:
        signature = b""
    else:
        signature = key.sign(signed.encode())
    return f"{signed}.{b64(signature)}"


def jwt_config(source: str, *, upstream_port: int | None = None, extra: str = "") -> str:
    """A gateway config with one route, `api`, behind a jwt stage keyed by `source` (e.g.
    "jwks_file: /abs/jwks.json"); to an upstream on 127.0.0.1 or, without one, the echo handler.
    `extra` is appended to the route's pipeline."""
    upstreams = ""
    upstream = "internal:echo"
    if upstream_port is not None:
        upstreams = (
            f'upstreams:\n  app: {{endpoints: [{{url: "http://127.0.0.1:{upstream_port}"}}]}}\n'
        )
        upstream = "app"
    return f"""\
listeners: [{{name: http, bind: "127.0.0.1:0"}}]
admin: {{bind: "127.0.0.1:0"}}
access_log: {{enabled: false}}
{upstreams}routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: {upstream}
    pipeline:
      - jwt:
          issuer: https://idp.test
          audiences: [api]
          algorithms: [RS256, ES256]
          {source}
          forward_claims: {{sub: X-User-Id, scope: X-Scope}}{extra}
"""
