"""TLS: certificates checked before use, server contexts, SNI selection, client certificates,
and development certificates for `gateway certs init`.

A listener's socket keeps one *front* `SSLContext` for its whole life; its SNI callback hands
each new handshake the context of the current snapshot that matches the requested name (or the
listener's default, the first certificate).  A reload that changes certificates or the client CA
therefore reaches new handshakes at once, while established connections keep what they
negotiated.  Every certificate is validated before a snapshot uses it: it parses, its key
matches, and it is valid now — a broken one is a config error, never a half-working listener.

Defaults follow Mozilla's "intermediate" profile: TLS 1.2 and 1.3 only, ECDHE with AES-GCM or
ChaCha20-Poly1305 for TLS 1.2, no compression, no renegotiation, ALPN `http/1.1`.
"""

from __future__ import annotations

import base64
import datetime
import fnmatch
import hashlib
import ipaddress
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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


class CertificateProblem(Exception):
    """A certificate, key or CA bundle that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class CheckedCertificate:
    cert: Path
    key: Path
    #: DNS names (and IP addresses) it serves, lower case; "*.example.com" for a wildcard
    names: tuple[str, ...]
    not_after: datetime.datetime


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def check_certificate(
    cert: Path, key: Path, now: datetime.datetime | None = None
) -> CheckedCertificate:
    """Parse `cert` and `key`, check they belong together and the certificate is valid now."""
    now = now or _now()
    try:
        chain = x509.load_pem_x509_certificates(cert.read_bytes())
    except OSError as exc:
        raise CertificateProblem(f"cannot read {cert}: {exc.strerror or exc}") from None
    except ValueError:
        raise CertificateProblem(f"{cert} is not a PEM certificate") from None
    leaf = chain[0]
    try:
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except OSError as exc:
        raise CertificateProblem(f"cannot read {key}: {exc.strerror or exc}") from None
    except (ValueError, TypeError):
        raise CertificateProblem(f"{key} is not an unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if private.public_key().public_bytes(der, public) != leaf.public_key().public_bytes(
        der, public
    ):
        raise CertificateProblem(f"{key} is not the private key of {cert}")
    if now > leaf.not_valid_after_utc:
        raise CertificateProblem(f"{cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if now < leaf.not_valid_before_utc:
        raise CertificateProblem(
            f"{cert} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    return CheckedCertificate(cert, key, _served_names(leaf), leaf.not_valid_after_utc)


def check_ca_bundle(path: Path) -> None:
    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        raise CertificateProblem(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise CertificateProblem(f"{path} is not a PEM certificate bundle") from None


def _served_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = None
    if sans is not None:
        names = [n.lower() for n in sans.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
        return tuple(names)
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return (str(common[0].value).lower(),) if common else ()


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


# -- development certificates -----------------------------------------------------------------


def _name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gateway development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue(
    issuer_key: ec.EllipticCurvePrivateKey | None,
    issuer: x509.Certificate | None,
    common: str,
    *,
    alt_names: Sequence[x509.GeneralName] = (),
    is_ca: bool = False,
    client: bool = False,
    not_before: datetime.datetime | None = None,
    days: int = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new P-256 key and a certificate for it, signed by `issuer` (self-signed when None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - datetime.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(issuer.subject if issuer is not None else _name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
    )
    for extension, critical in _extensions(key, issuer, alt_names, is_ca=is_ca, client=client):
        builder = builder.add_extension(extension, critical=critical)
    signer = issuer_key or key
    return key, builder.sign(signer, hashes.SHA256())


def _extensions(
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    alt_names: Sequence[x509.GeneralName],
    *,
    is_ca: bool,
    client: bool,
) -> list[tuple[x509.ExtensionType, bool]]:
    """(extension, critical) pairs that strict RFC 5280 validators ask for.

    `openssl verify -x509_strict` and cryptography's verifier refuse a leaf without an Authority
    Key Identifier, and a CA without a Subject Key Identifier or a key usage; both key
    identifiers let a validator pick the issuing key when a store holds several.
    """
    result: list[tuple[x509.ExtensionType, bool]] = [
        (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
        (x509.BasicConstraints(ca=is_ca, path_length=None), True),
        (_key_usage(is_ca), True),
    ]
    if issuer is not None:
        issuer_id = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        identifier = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_id)
        result.append((identifier, False))
    if alt_names:
        result.append((x509.SubjectAlternativeName(alt_names), False))
    if not is_ca:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        result.append((x509.ExtendedKeyUsage([usage]), False))
    return result


def _key_usage(is_ca: bool) -> x509.KeyUsage:
    # P-256 keys only sign (ECDHE does the key exchange): keyEncipherment, RSA key transport,
    # would be wrong on them
    return x509.KeyUsage(
        digital_signature=not is_ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=is_ca,
        crl_sign=is_ca,
        encipher_only=False,
        decipher_only=False,
    )


def write_pem(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def init_dev_certificates(out: Path, hosts: Sequence[str]) -> list[Path]:
    """A development CA, a server certificate for `hosts` and a client certificate, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca = issue(None, None, "gateway development CA", is_ca=True, days=3650)
    server_key, server = issue(ca_key, ca, hosts[0], alt_names=_alt_names(hosts))
    client_key, client = issue(
        ca_key,
        ca,
        "gateway development client",
        alt_names=[
            x509.UniformResourceIdentifier("spiffe://gateway.dev/client"),
            x509.DNSName("client.gateway.dev"),
        ],
        client=True,
    )
    written = []
    for name, key, cert in (
        ("ca", ca_key, ca),
        ("server", server_key, server),
        ("client", client_key, client),
    ):
        write_pem(out / f"{name}.crt", cert)
        write_key(out / f"{name}.key", key)
        written += [out / f"{name}.crt", out / f"{name}.key"]
    return written
