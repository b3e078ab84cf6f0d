"""The `mtls` stage (SPEC §5.1): authorize a route by the client certificate.

The chain was verified at the handshake against the listener's `client_ca`; this stage decides
whether *this route* wants one and which: no certificate (or a plain-HTTP request) when one is
`required` → 403 `client_certificate_required`; a certificate matching none of `allowed_sans`
and `allowed_subjects` (when either is set) → 403 `client_certificate_forbidden`.  The verified
certificate then goes upstream as RFC 9440 `Client-Cert` or Envoy-style
`X-Forwarded-Client-Cert`; copies a client sent of either are always dropped by forwarding.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Final, Literal, final

from gateway.config.model import StageSpec
from gateway.config.reader import Fields, as_bool, choice
from gateway.config.stages import PipelineCheck
from gateway.errors import ClientCertificateForbidden, ClientCertificateRequired, ConfigError
from gateway.http.messages import Response
from gateway.pipeline import Next, RequestContext
from gateway.stages.kind import BuildContext, StageKind


@dataclass(frozen=True, slots=True, kw_only=True)
class MtlsConfig:
    """Client-certificate authorization for a route (the handshake already verified the chain)."""

    required: bool = True
    #: globs over the certificate's DNS/URI/e-mail/IP SANs
    allowed_sans: tuple[str, ...] = ()
    #: globs over its RFC 4514 subject
    allowed_subjects: tuple[str, ...] = ()
    forward: Literal["rfc9440", "xfcc", "none"] = "rfc9440"


EXAMPLE: Final = """\
required: true
allowed_sans: ["spiffe://example.org/*", "*.internal.example.org"]
forward: rfc9440
"""


def _globs(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "must be a non-empty list of patterns")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{path}[{i}]", "must be a pattern (text, * and ? as wildcards)")
    return tuple(value)


_FIELDS: Final = Fields(
    MtlsConfig,
    {
        "required": as_bool,
        "allowed_sans": _globs,
        "allowed_subjects": _globs,
        "forward": choice("rfc9440", "xfcc", "none"),
    },
)


def _check(check: PipelineCheck, config: MtlsConfig) -> MtlsConfig:
    if not check.verifies_clients:
        check.error("mtls needs a listener with tls.client_ca to verify clients")
    return config


@final
class MtlsStage:
    __slots__ = ("_forward", "_required", "_sans", "_subjects")

    def __init__(self, config: MtlsConfig) -> None:
        self._required = config.required
        self._sans = config.allowed_sans
        self._subjects = config.allowed_subjects
        self._forward = config.forward

    def __call__(self, ctx: RequestContext, call_next: Next) -> Awaitable[Response]:
        """The rest of the pipeline's awaitable once the certificate is checked: not a
        coroutine, as there is nothing to do on the way back and a coroutine would be one more
        frame made and run for every request of the route.  A refusal raises here, at the
        call, which its caller awaits in the same expression (see gateway.pipeline.Stage)."""
        cert = ctx.peer.client_cert
        if cert is None:
            if self._required:
                ctx.outcome("mtls", "missing")
                raise ClientCertificateRequired("this route needs a client certificate")
            return call_next(ctx)
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
        return call_next(ctx)


def build(config: MtlsConfig, spec: StageSpec, env: BuildContext) -> MtlsStage:
    return MtlsStage(config)


KIND: Final[StageKind[MtlsConfig, MtlsStage]] = StageKind(
    name="mtls", parse=_FIELDS.parse, build=build, example=EXAMPLE, check=_check
)
