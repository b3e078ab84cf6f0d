"""TLS in the config: certificates checked at load, every problem at its YAML path."""

from __future__ import annotations

import base64
import contextlib
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.certificates import check_certificate
from gateway.errors import ConfigErrors
from gateway.tls import ClientCertificate, DirectSSLObject, ListenerTLS, front_context
from tests.support.certs import TestCA, other_key
from tests.support.config import load_config


def _write(tmp_path: Path, tls: str, pipeline: str = "[]") -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        f"""
listeners:
  - name: https
    bind: "127.0.0.1:8443"
    tls: {tls}
routes:
  - {{name: r, match: {{path_prefix: /}}, upstream: internal:echo, pipeline: {pipeline}}}
"""
    )
    return path


def _errors(path: Path) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path))
    return [str(e) for e in info.value.errors]


def test_relative_paths_and_names(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    ca.issue("server", dns=("a.test", "*.b.test"), ips=("127.0.0.1",))
    config = load_config(
        str(
            _write(
                tmp_path,
                "{certificates: [{cert: server.crt, key: server.key}], client_ca: test-ca.crt}",
            )
        )
    )
    tls = config.listeners[0].tls
    assert tls is not None
    assert tls.certificates[0].cert == str(tmp_path / "server.crt")
    assert tls.certificates[0].names == ("a.test", "*.b.test", "127.0.0.1")
    assert tls.client_ca == str(tmp_path / "test-ca.crt")
    assert tls.min_version == "1.2"


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("expired", "expired on"),
        ("mismatch", "is not the private key of"),
        ("garbage", "is not a PEM certificate"),
        ("missing", "no such file"),
    ],
)
def test_a_broken_certificate_is_a_config_error(tmp_path: Path, problem: str, message: str) -> None:
    ca = TestCA(tmp_path)
    issued = ca.issue("server", dns=("a.test",), expired=problem == "expired")
    if problem == "mismatch":
        other_key(issued.key)
    if problem == "garbage":
        issued.cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    cert = "nowhere.crt" if problem == "missing" else "server.crt"
    errors = _errors(_write(tmp_path, f"{{certificates: [{{cert: {cert}, key: server.key}}]}}"))
    assert len(errors) == 1, errors
    assert errors[0].startswith("listeners[0].tls.certificates[0].cert: ")
    assert message in errors[0]


def test_other_tls_errors(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    ca.issue("server", dns=("a.test",))
    (tmp_path / "bad-ca.crt").write_text("nope")
    errors = _errors(
        _write(
            tmp_path,
            "{certificates: [{cert: server.crt, key: server.key}], client_ca: bad-ca.crt,"
            " min_version: '1.1', ciphers: x}",
        )
    )
    assert "listeners[0].tls.ciphers: unknown key" in errors
    assert any(e.startswith("listeners[0].tls.client_ca: ") and "not a PEM" in e for e in errors)
    assert 'listeners[0].tls.min_version: must be "1.2" or "1.3"' in errors


def test_mtls_needs_a_listener_asking_for_client_certificates(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    ca.issue("server", dns=("a.test",))
    errors = _errors(
        _write(tmp_path, "{certificates: [{cert: server.crt, key: server.key}]}", "[{mtls: {}}]")
    )
    assert errors == [
        "routes[0].pipeline[0]: mtls needs a listener with tls.client_ca to verify clients"
    ]


def test_sni_selection(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    a = ca.issue("a", dns=("a.test",))
    b = ca.issue("b", dns=("b.test", "*.apps.test"))
    tls = ListenerTLS.build(
        [check_certificate(a.cert, a.key), check_certificate(b.cert, b.key)], None, "1.2"
    )
    assert tls.select(None) is tls.default
    assert tls.select("A.TEST.") is tls.default
    assert tls.select("b.test") is not tls.default
    assert tls.select("x.apps.test") is tls.select("b.test")
    assert tls.select("deep.x.apps.test") is tls.default  # a wildcard covers one label


def test_client_certificate_matching(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    issued = ca.issue(
        "c",
        dns=("Front.Corp",),
        uris=("spiffe://corp/ns/web",),
        emails=("ops@corp.example",),
        ips=("10.1.2.3",),
        client=True,
        common="web",
    )
    der = x509.load_pem_x509_certificate(issued.cert.read_bytes()).public_bytes(Encoding.DER)
    cert = ClientCertificate.from_der(der)
    assert cert.subject == "CN=web,O=gateway development"
    assert cert.matches_san(["front.corp"])  # DNS without case
    assert cert.matches_san(["spiffe://corp/ns/*"])
    assert not cert.matches_san(["SPIFFE://corp/ns/*"])  # URIs as written
    assert cert.matches_san(["*@corp.example"])
    assert cert.matches_san(["10.1.2.*"])
    assert not cert.matches_san(["spiffe://other/*"])
    assert cert.matches_subject(["CN=web,*"])
    assert not cert.matches_subject(["CN=api,*"])
    assert cert.rfc9440_value == b":" + base64.b64encode(der) + b":"


def _upstream(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        f"""
listeners: [{{name: http, bind: "127.0.0.1:8080"}}]
upstreams:
  u: {body}
"""
    )
    return path


def test_upstream_tls(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    ca.issue("client", dns=("gw.internal",), client=True)
    config = load_config(
        str(
            _upstream(
                tmp_path,
                '{endpoints: [{url: "https://10.0.0.1"}], tls: {ca: test-ca.crt,'
                " cert: client.crt, key: client.key, server_name: Users.Internal}}",
            )
        )
    )
    [upstream] = config.upstreams
    assert upstream.endpoints[0].port == 443
    assert upstream.tls is not None
    assert upstream.tls.server_name == "users.internal"
    assert upstream.tls.cert == str(tmp_path / "client.crt")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (
            '{endpoints: [{url: "https://a"}, {url: "http://b"}]}',
            "upstreams.u.endpoints: must all be http:// or all https://",
        ),
        (
            '{endpoints: [{url: "http://a"}], tls: {}}',
            "upstreams.u.tls: applies to https:// endpoints; these are http://",
        ),
        (
            '{endpoints: [{url: "https://a"}], tls: {cert: client.crt}}',
            "upstreams.u.tls.key: cert and key go together",
        ),
        (
            '{endpoints: [{url: "ftp://a"}]}',
            "upstreams.u.endpoints[0].url: must be http(s)://host[:port], not 'ftp://a'",
        ),
    ],
)
def test_upstream_tls_errors(tmp_path: Path, body: str, error: str) -> None:
    assert error in _errors(_upstream(tmp_path, body))


def _pump(source: ssl.MemoryBIO, target: ssl.MemoryBIO) -> None:
    data = source.read()
    if data:
        target.write(data)


def test_a_listeners_tls_objects_call_ssl_directly_and_still_serve_sni(tmp_path: Path) -> None:
    """The listener's connections read, write and count pending bytes through the C object's
    own methods (no ssl.SSLObject wrapper frame per call), and are otherwise ssl's: a
    handshake asking for b.test is switched to b's certificate, and bytes go both ways.  The
    client gets one session ticket, not OpenSSL's default two."""
    ca = TestCA(tmp_path)
    a = ca.issue("a", dns=("a.test",))
    b = ca.issue("b", dns=("b.test",))
    tls = ListenerTLS.build(
        [check_certificate(a.cert, a.key), check_certificate(b.cert, b.key)], None, "1.2"
    )
    front = front_context(lambda: tls)
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server = front.wrap_bio(server_in, server_out, server_side=True)
    assert isinstance(server, DirectSSLObject)
    inner = server._sslobj  # type: ignore[attr-defined]
    for method in ("read", "write", "pending"):
        assert getattr(server, method).__self__ is inner
    client_context = ssl.create_default_context(cafile=str(ca.path))
    tickets: list[bytes] = []

    def seen(
        conn: object, direction: str, version: object, kind: object, message: object, data: bytes
    ) -> None:
        if direction == "read" and message == ssl._TLSMessageType.NEWSESSION_TICKET:
            tickets.append(data)

    # ssl's message hook: private, but the only way to see each session ticket arrive
    client_context._msg_callback = seen  # type: ignore[attr-defined]
    client = client_context.wrap_bio(client_in, client_out, server_hostname="b.test")
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):  # the other side's turn
                side.do_handshake()
        _pump(client_out, server_in)
        _pump(server_out, client_in)
    peer = client.getpeercert()
    assert peer is not None
    assert ("DNS", "b.test") in peer["subjectAltName"]
    assert client.write(b"GET / HTTP/1.1\r\n\r\n") == 18
    _pump(client_out, server_in)
    assert server.read(1024) == b"GET / HTTP/1.1\r\n\r\n"
    assert server.pending() == 0
    buffer = bytearray(64)
    assert server.write(b"HTTP/1.1 204 No Content\r\n\r\n") == 27
    _pump(server_out, client_in)
    assert client.read(64, buffer) == 27
    assert bytes(buffer[:27]) == b"HTTP/1.1 204 No Content\r\n\r\n"
    # one TLS 1.3 session ticket per connection, not OpenSSL's two
    assert len(tickets) == 1
