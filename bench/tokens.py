"""The edge scenario's credentials: an ES256 key pair made at scenario start, its JWKS (the file
the gateway's jwt stage reads) and one token signed with it, which wrk sends on every request."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

ISSUER: Final = "https://idp.bench.invalid"
AUDIENCE: Final = "bench-api"
SUBJECT: Final = "bench-user"
KID: Final = "bench-es256"
#: the jwt stage of the edge route (its JWKS is the file `jwks.json` beside the config)
JWT_STAGE: Final = (
    f'jwt: {{issuer: "{ISSUER}", audiences: [{AUDIENCE}], algorithms: [ES256], '
    "jwks_file: jwks.json, required_claims: [sub]}"
)


@dataclass(frozen=True)
class Credentials:
    #: the JWKS document holding the public key
    jwks: bytes
    #: a compact JWS, valid for `lifetime` seconds from when it was minted
    token: str

    @property
    def header(self) -> str:
        """The request header wrk sends (`-H`)."""
        return f"Authorization: Bearer {self.token}"


def mint(lifetime: float = 3600.0) -> Credentials:
    """A fresh P-256 key pair, its public half as a JWKS, and one token (iss, aud, sub, iat, exp)
    signed with the private half."""
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwk.update({"kid": KID, "alg": "ES256", "use": "sig"})
    now = int(time.time())
    token = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": SUBJECT, "iat": now, "exp": now + int(lifetime)},
        private,
        algorithm="ES256",
        headers={"kid": KID},
    )
    return Credentials(jwks=json.dumps({"keys": [jwk]}).encode(), token=token)
