"""Development certificates for `gateway certs init` and the tests: a CA, a server certificate and
a client certificate, P-256 keys, with the extensions strict RFC 5280 validators ask for.
Never used to serve production traffic."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


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


def init_dev_certificates(
    out: Path, hosts: Sequence[str], *, keep_ca_key: bool = True
) -> list[Path]:
    """A development CA, a server certificate for `hosts` and a client certificate, in `out`.

    Without `keep_ca_key` the CA's key is never written: it signs the two certificates and is
    gone, so nobody can mint another certificate the CA vouches for (the container image's first
    start writes them so).
    """
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
        written.append(out / f"{name}.crt")
        if name != "ca" or keep_ca_key:
            write_key(out / f"{name}.key", key)
            written.append(out / f"{name}.key")
    return written
