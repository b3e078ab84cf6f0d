"""TLS at the listeners: server contexts, SNI selection, and the client certificate a
connection presented.

A listener's socket keeps one *front* `SSLContext` for its whole life; its SNI callback hands
each new handshake the context of the current snapshot that matches the requested name (or the
listener's default, the first certificate).  A reload that changes certificates or the client CA
therefore reaches new handshakes at once, while established connections keep what they
negotiated.  The certificates were checked by the loader (`gateway.certificates`) before a
snapshot uses them.

Defaults follow Mozilla's "intermediate" profile: TLS 1.2 and 1.3 only, ECDHE with AES-GCM or
ChaCha20-Poly1305 for TLS 1.2, no compression, no renegotiation, ALPN `http/1.1`.
"""

from __future__ import annotations

import base64
import datetime
import fnmatch
import hashlib
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509

from gateway.certificates import CheckedCertificate
from gateway.config.model import ListenerTLSConfig

#: TLS 1.2 suites of the intermediate profile we can serve (the DHE ones need DH parameters)
INTERMEDIATE_CIPHERS: Final = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(
    cert: CheckedCertificate, client_ca: Path | None, min_version: str
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.set_ecdh_curve("prime256v1")
    ctx.load_cert_chain(str(cert.cert), str(cert.key))
    if client_ca is not None:
        # optional at the handshake; a route's mtls stage decides whether one is required
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cafile=str(client_ca))
    return ctx


def listener_tls(config: ListenerTLSConfig) -> ListenerTLS:
    """Contexts for a listener's checked certificates (the loader validated them)."""
    certificates = [
        CheckedCertificate(
            Path(c.cert),
            Path(c.key),
            c.names,
            datetime.datetime.fromtimestamp(c.not_after, datetime.UTC),
        )
        for c in config.certificates
    ]
    client_ca = Path(config.client_ca) if config.client_ca else None
    return ListenerTLS.build(certificates, client_ca, config.min_version)


@dataclass(frozen=True, slots=True)
class ListenerTLS:
    """One listener's certificates as contexts, chosen by server name."""

    default: ssl.SSLContext
    exact: dict[str, ssl.SSLContext]
    wildcards: dict[str, ssl.SSLContext]
    certificates: tuple[CheckedCertificate, ...]
    client_ca: Path | None

    @classmethod
    def build(
        cls, certificates: Sequence[CheckedCertificate], client_ca: Path | None, min_version: str
    ) -> ListenerTLS:
        contexts = [server_context(c, client_ca, min_version) for c in certificates]
        exact: dict[str, ssl.SSLContext] = {}
        wildcards: dict[str, ssl.SSLContext] = {}
        for cert, ctx in zip(certificates, contexts, strict=True):
            for name in cert.names:
                # the first certificate listed for a name wins, as in the file
                if name.startswith("*."):
                    wildcards.setdefault(name[2:], ctx)
                else:
                    exact.setdefault(name, ctx)
        return cls(contexts[0], exact, wildcards, tuple(certificates), client_ca)

    def select(self, server_name: str | None) -> ssl.SSLContext:
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(".")
        ctx = self.exact.get(name)
        if ctx is not None:
            return ctx
        # a wildcard covers exactly one label: *.example.com matches a.example.com only
        _, _, parent = name.partition(".")
        return self.wildcards.get(parent, self.default)


class DirectSSLObject(ssl.SSLObject):
    """The TLS state of one connection, whose `read`, `write` and `pending` are its C object's
    own methods rather than ssl.SSLObject's Python wrappers around them.

    uvloop drives TLS through those three (it keeps them bound per connection), several times a
    request; each wrapper is an interpreted frame that only passes its arguments on: together
    1.5k of the 25k instructions TLS added to a keep-alive HTTPS request (callgrind,
    `python -m bench.callgrind --tls`).  Here they are the methods the wrappers call, set on
    the instance when it is made, so a call goes straight to C with the same arguments and the
    same results.  Everything else (the handshake, the peer certificate, `context` for SNI) is
    ssl.SSLObject's own.
    """

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> DirectSSLObject:
        self: DirectSSLObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        inner = self._sslobj  # type: ignore[attr-defined]
        # instance attributes shadow the class's methods for every reader, uvloop included
        vars(self).update(read=inner.read, write=inner.write, pending=inner.pending)
        return self


def front_context(current: Callable[[], ListenerTLS]) -> ssl.SSLContext:
    """The listener socket's context: each handshake switches to the current snapshot's.

    Whether clients are asked for a certificate is decided by this context (OpenSSL keeps the
    first context's verify mode through the switch; the trusted CAs do come from the new one),
    so turning `client_ca` on or off needs a restart, while a changed CA file applies live.
    """
    first = current()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = first.default.minimum_version
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.set_ecdh_curve("prime256v1")
    cert = first.certificates[0]
    ctx.load_cert_chain(str(cert.cert), str(cert.key))
    if first.client_ca is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cafile=str(first.client_ca))

    def on_server_name(
        sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        sslobj.context = current().select(server_name)
        return None

    ctx.sni_callback = on_server_name
    ctx.sslobject_class = DirectSSLObject
    # One TLS 1.3 session ticket per connection, as Go's servers (Caddy, Traefik) send, not
    # OpenSSL's two: OpenSSL 3.0 copies the session for each ticket by encoding and decoding
    # it, the client's certificate included, so the second ticket cost a full handshake ~4 %
    # of its instructions and one with a client certificate ~13 % (callgrind, `python -m
    # bench.callgrind --tls|--mtls --handshakes full`).  A client still gets a fresh ticket
    # from every connection it makes.  (Read from the context the connection starts on: the
    # SNI switch keeps it.)
    ctx.num_tickets = 1
    return ctx


# -- client certificates ----------------------------------------------------------------------


class ClientCertificate:
    """A client certificate verified at the handshake, parsed once per connection, with the
    header values it is forwarded as, so no request encodes it again."""

    __slots__ = ("der", "rfc9440_value", "san_values", "sans", "subject", "xfcc_value")

    def __init__(self, der: bytes, subject: str, sans: tuple[tuple[str, str], ...]) -> None:
        self.der = der
        self.subject = subject
        #: (kind, value): kind is DNS, URI, email or IP
        self.sans = sans
        self.san_values = tuple(v for _, v in sans)
        self.rfc9440_value = self.rfc9440()
        self.xfcc_value = self.xfcc()

    @classmethod
    def from_der(cls, der: bytes) -> ClientCertificate:
        cert = x509.load_der_x509_certificate(der)
        sans: list[tuple[str, str]] = []
        try:
            ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            ext = None
        if ext is not None:
            sans += [("DNS", v) for v in ext.get_values_for_type(x509.DNSName)]
            sans += [("URI", v) for v in ext.get_values_for_type(x509.UniformResourceIdentifier)]
            sans += [("email", v) for v in ext.get_values_for_type(x509.RFC822Name)]
            sans += [("IP", str(v)) for v in ext.get_values_for_type(x509.IPAddress)]
        return cls(der, cert.subject.rfc4514_string(), tuple(sans))

    def matches_san(self, patterns: Sequence[str]) -> bool:
        for kind, value in self.sans:
            # DNS names compare without case; URIs, e-mail and IPs as written
            candidate = value.lower() if kind == "DNS" else value
            for pattern in patterns:
                if fnmatch.fnmatchcase(candidate, pattern.lower() if kind == "DNS" else pattern):
                    return True
        return False

    def matches_subject(self, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(self.subject, p) for p in patterns)

    def rfc9440(self) -> bytes:
        """The Client-Cert header value: the DER as a structured-field byte sequence."""
        return b":" + base64.b64encode(self.der) + b":"

    def xfcc(self) -> bytes:
        """An Envoy-style X-Forwarded-Client-Cert element."""
        parts = [f"Hash={hashlib.sha256(self.der).hexdigest()}"]
        parts.append('Subject="' + self.subject.replace("\\", "\\\\").replace('"', '\\"') + '"')
        parts += [f"URI={v}" for k, v in self.sans if k == "URI"]
        parts += [f"DNS={v}" for k, v in self.sans if k == "DNS"]
        return ";".join(parts).encode("latin-1", "replace")
