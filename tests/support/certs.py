"""Certificates made at test time: CAs, servers and clients, valid, expired or for other names."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.dev_certificates import issue, write_key, write_pem


@dataclass
class Issued:
    cert: Path
    key: Path


class TestCA:
    """A CA that writes what it issues into `directory`."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self, directory: Path, name: str = "test-ca") -> None:
        self.directory = directory
        self.name = name
        self.key, self.cert = issue(None, None, f"{name} root", is_ca=True, days=30)
        self.path = directory / f"{name}.crt"
        write_pem(self.path, self.cert)

    def issue(
        self,
        stem: str,
        *,
        dns: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
        emails: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        client: bool = False,
        expired: bool = False,
        common: str | None = None,
    ) -> Issued:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.RFC822Name(e) for e in emails]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        start = None
        if expired:
            start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
        key, cert = issue(
            self.key,
            self.cert,
            common or stem,
            alt_names=names,
            client=client,
            not_before=start,
            days=1 if expired else 30,
        )
        issued = Issued(self.directory / f"{stem}.crt", self.directory / f"{stem}.key")
        write_pem(issued.cert, cert)
        write_key(issued.key, key)
        return issued


def other_key(path: Path) -> None:
    """Write an unrelated private key at `path`."""
    write_key(path, ec.generate_private_key(ec.SECP256R1()))


REPO = Path(__file__).resolve().parents[2]


def ensure_dev_certificates() -> Path:
    """The repo's development certificates (`make` writes them; a bare pytest run may not have)."""
    from gateway.dev_certificates import init_dev_certificates

    certs = REPO / "certs"
    if not (certs / "server.crt").exists():
        init_dev_certificates(certs, ["localhost", "127.0.0.1"])
    return certs
