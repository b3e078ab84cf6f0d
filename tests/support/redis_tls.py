"""A real `redis-server` that speaks only TLS, with certificates made at test time.

A fresh CA (`tests.support.certs.TestCA`) signs a server certificate for 127.0.0.1 and a client
certificate; the plain port is closed (`--port 0`) so nothing can reach the server without TLS.
By default the server requires a client certificate (`--tls-auth-clients yes`); `optional`
checks one when it is offered, `no` never asks for one.

Debian's redis-server is linked against OpenSSL (`--tls-port` works), so no build of our own is
needed.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Literal

from tests.support.certs import TestCA
from tests.support.redis_server import RedisServer

AuthClients = Literal["yes", "optional", "no"]


class TLSRedisServer(RedisServer):
    """A `RedisServer` on a TLS port only; `url` is a `rediss://` url.

    `ca`, `client_cert` and `client_key` are the paths a client needs; `server_cert` and
    `server_key` are the server's own.
    """

    def __init__(
        self,
        directory: Path,
        *extra: str,
        auth_clients: AuthClients = "yes",
        port: int | None = None,
    ) -> None:
        super().__init__(directory, *extra, port=port)
        self.auth_clients = auth_clients
        certs = directory / "tls"
        certs.mkdir(parents=True, exist_ok=True)
        # a CA of its own per server: no other test's CA (nor the repo's dev CA) is trusted
        self._ca = TestCA(certs, "redis-ca")
        server = self._ca.issue("redis-server", ips=("127.0.0.1",), dns=("localhost",))
        client = self._ca.issue("redis-client", client=True)
        self.ca = self._ca.path
        self.server_cert, self.server_key = server.cert, server.key
        self.client_cert, self.client_key = client.cert, client.key

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def _listen_args(self) -> list[str]:
        return [
            # no plain port at all: a client that does not speak TLS gets nothing
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            str(self.server_cert),
            "--tls-key-file",
            str(self.server_key),
            "--tls-ca-cert-file",
            str(self.ca),
            "--tls-auth-clients",
            self.auth_clients,
        ]

    def _cli_args(self) -> list[str]:
        return [
            "--tls",
            "--cacert",
            str(self.ca),
            "--cert",
            str(self.client_cert),
            "--key",
            str(self.client_key),
        ]

    def client_context(self) -> ssl.SSLContext:
        """An SSL context trusting this server's CA and presenting the client certificate."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context

    def ping(self) -> bool:
        """Whether the server answers PING over TLS now (the plain `ping` would find no port)."""
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw,
                self.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as sock,
            ):
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:  # ssl.SSLError is an OSError too: a server not yet ready to shake hands
            return False
