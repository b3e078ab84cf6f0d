"""`gateway certs init`'s certificates pass strict RFC 5280 validators, not only OpenSSL's default.

Two independent validators: cryptography's `PolicyBuilder` (the CA/Browser-forum-leaning
profile of its Rust verifier) and `openssl verify -x509_strict`.  OpenSSL is required: a test
that needs it fails when it is missing rather than skipping.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from gateway.dev_certificates import init_dev_certificates

HOSTS = ["example.test", "127.0.0.1", "::1"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    init_dev_certificates(out, HOSTS)
    return out


def _load(certs: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((certs / f"{name}.crt").read_bytes())


@pytest.mark.parametrize(
    "subject",
    [
        x509.DNSName("example.test"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ],
    ids=["dns", "ipv4", "ipv6"],
)
def test_the_server_certificate_verifies_for_each_host(
    certs: Path, subject: x509.DNSName | x509.IPAddress
) -> None:
    verifier = PolicyBuilder().store(Store([_load(certs, "ca")])).build_server_verifier(subject)
    chain = verifier.verify(_load(certs, "server"), [])
    assert chain[-1] == _load(certs, "ca")


def test_the_server_certificate_is_for_its_hosts_only(certs: Path) -> None:
    verifier = (
        PolicyBuilder()
        .store(Store([_load(certs, "ca")]))
        .build_server_verifier(x509.DNSName("other.test"))
    )
    with pytest.raises(x509.verification.VerificationError):
        verifier.verify(_load(certs, "server"), [])


def test_the_client_certificate_verifies_as_a_client(certs: Path) -> None:
    verifier = PolicyBuilder().store(Store([_load(certs, "ca")])).build_client_verifier()
    verified = verifier.verify(_load(certs, "client"), [])
    assert verified.subjects is not None
    assert x509.UniformResourceIdentifier("spiffe://gateway.dev/client") in verified.subjects


@pytest.mark.parametrize(
    ("name", "purpose"),
    [("server", "sslserver"), ("client", "sslclient")],
    ids=["server", "client"],
)
def test_openssl_x509_strict_accepts_the_chain(certs: Path, name: str, purpose: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("these tests need the openssl command (apt-get install openssl)")
    result = subprocess.run(
        [
            openssl,
            "verify",
            "-x509_strict",
            "-purpose",
            purpose,
            "-CAfile",
            str(certs / "ca.crt"),
            str(certs / f"{name}.crt"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{certs / name}.crt: OK"


def _usage(cert: x509.Certificate) -> tuple[bool, set[str]]:
    extension = cert.extensions.get_extension_for_class(x509.KeyUsage)
    usage = extension.value
    names = {
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
    }
    return extension.critical, {n for n in names if getattr(usage, n)}


@pytest.mark.parametrize(
    ("name", "usage", "extended"),
    [
        ("ca", {"key_cert_sign", "crl_sign"}, None),
        # P-256 keys sign; keyEncipherment is RSA key transport, never set for them
        ("server", {"digital_signature"}, ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", {"digital_signature"}, ExtendedKeyUsageOID.CLIENT_AUTH),
    ],
    ids=["ca", "server", "client"],
)
def test_extensions(
    certs: Path, name: str, usage: set[str], extended: x509.ObjectIdentifier | None
) -> None:
    cert = _load(certs, name)
    ca = _load(certs, "ca")
    extensions = cert.extensions
    key_id = x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    assert extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value == key_id
    constraints = extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is (name == "ca")
    assert _usage(cert) == (True, usage)
    if extended is None:
        return  # the CA: self-signed, a trust anchor
    assert list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [extended]
    authority = extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert not authority.critical
    ca_key_id = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert authority.value.key_identifier == ca_key_id.digest


def test_server_names_are_dns_or_ip_as_written(certs: Path) -> None:
    san = _load(certs, "server").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    assert list(san.value) == [
        x509.DNSName("example.test"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]


def test_without_the_ca_key_nothing_more_can_be_signed_but_the_chain_still_verifies(
    tmp_path: Path,
) -> None:
    # what the container image's first start writes (`gateway certs init --no-ca-key`)
    written = init_dev_certificates(tmp_path, HOSTS, keep_ca_key=False)
    names = sorted(path.name for path in written)
    assert names == ["ca.crt", "client.crt", "client.key", "server.crt", "server.key"]
    assert sorted(path.name for path in tmp_path.iterdir()) == names
    assert not any(b"PRIVATE KEY" in path.read_bytes() for path in tmp_path.glob("*.crt"))
    ca = _load(tmp_path, "ca")
    chain = (
        PolicyBuilder()
        .store(Store([ca]))
        .build_server_verifier(x509.DNSName("example.test"))
        .verify(_load(tmp_path, "server"), [])
    )
    assert chain[-1] == ca
