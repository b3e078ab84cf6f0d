"""Certificates checked before any snapshot uses them: a certificate and its key parse, belong
together and are valid now; a CA bundle parses.  A broken one is a config error (the loader
reports it at its YAML path), never a half-working listener.

A leaf module (the `cryptography` package only), so the config loader can check files without
importing the TLS runtime that builds on its output.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID


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
