"""The `mtls` stage (SPEC §5.1): authorize a route by the client certificate.

The chain was verified at the handshake against the listener's `client_ca`; this stage decides
whether *this route* wants one and which: no certificate (or a plain-HTTP request) when one is
`required` → 403 `client_certificate_required`; a certificate matching none of `allowed_sans`
and `allowed_subjects` (when either is set) → 403 `client_certificate_forbidden`.  The verified
certificate then goes upstream as RFC 9440 `Client-Cert` or Envoy-style
`X-Forwarded-Client-Cert`; copies a client sent of either are always dropped by forwarding.
"""

from __future__ import annotations

from typing import final

from gateway.config.model import MtlsConfig
from gateway.errors import ClientCertificateForbidden, ClientCertificateRequired
from gateway.http.messages import Response
from gateway.pipeline import Next, RequestContext


@final
class MtlsStage:
    __slots__ = ("_forward", "_required", "_sans", "_subjects")

    def __init__(self, config: MtlsConfig) -> None:
        self._required = config.required
        self._sans = config.allowed_sans
        self._subjects = config.allowed_subjects
        self._forward = config.forward

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Response:
        cert = ctx.peer.client_cert
        if cert is None:
            if self._required:
                ctx.outcome("mtls", "missing")
                raise ClientCertificateRequired("this route needs a client certificate")
            return await call_next(ctx)
        if (self._sans or self._subjects) and not (
            (self._sans and cert.matches_san(self._sans))
            or (self._subjects and cert.matches_subject(self._subjects))
        ):
            ctx.outcome("mtls", "forbidden")
            raise ClientCertificateForbidden("the client certificate is not allowed here")
        forward = self._forward
        if forward != "none":
            header = (
                (b"Client-Cert", cert.rfc9440_value)
                if forward == "rfc9440"
                else (b"X-Forwarded-Client-Cert", cert.xfcc_value)
            )
            ctx.add_upstream_header(*header)
        return await call_next(ctx)
