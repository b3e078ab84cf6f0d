"""The client side of TLS to upstreams: one context per upstream, built once.

Endpoints are verified against the upstream's `tls.ca` (or the system's CAs) under
`tls.server_name` (or each endpoint's host), TLS 1.2 at least; `tls.cert`/`key` are presented
to upstreams that ask for a client certificate (upstream mTLS).
"""

from __future__ import annotations

import ssl

from gateway.config.model import UpstreamTLSConfig


def client_context(config: UpstreamTLSConfig | None) -> ssl.SSLContext:
    ca = config.ca if config is not None else None
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    if config is not None and config.cert and config.key:
        ctx.load_cert_chain(config.cert, config.key)
    return ctx
