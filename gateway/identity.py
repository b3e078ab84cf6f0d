"""Who the client is, as a request says it: the values that rate-limit keys, idempotency scopes
and idempotency tokens' client ids are read from, read the same way for all of them.

The kinds, as the loader normalizes them: `client_ip` (the real client address: behind
`trusted_proxies`, the nearest untrusted X-Forwarded-For hop), `header:<lower-case name>`,
`jwt:<claim>` (of the token an earlier `jwt` stage verified), `mtls:san` (the SANs of the
certificate verified at the handshake, comma-joined — the form a backend mints tokens for) and
`consumer` (the name an earlier `api_key` or `basic_auth` stage authenticated).
A part answers None when the request lacks the value — no such header, claim or certificate, or
an empty one — and each caller decides what that means: a rate limit keys all such requests
together, an idempotency scope refuses them.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.pipeline import Peer, RequestContext

if TYPE_CHECKING:
    from gateway.runtime.snapshot import Snapshot

Part = Callable[[RequestContext], str | None]


def client_ip(ctx: RequestContext) -> str:
    """The client's address: behind trusted proxies, the nearest untrusted X-Forwarded-For hop."""
    return real_client(ctx.peer, ctx.head.x_forwarded_for, ctx.snapshot)


def real_client(peer: Peer, forwarded: bytes | None, snapshot: Snapshot) -> str:
    """`client_ip` from its parts, for a request that has no context (refused before routing,
    or not routed): the access log and the SERVER span name the same client the stages judged."""
    if not peer.trusted or not forwarded:
        return peer.ip
    hops = forwarded.decode("latin-1").split(",")
    for hop in reversed(hops):
        address = hop.strip()
        try:
            ipaddress.ip_address(address)
        except ValueError:
            # a malformed hop was written by whoever came before it: the last trusted one
            return peer.ip
        if not snapshot.is_trusted(address):
            return address
    return hops[0].strip()


def _address(ctx: RequestContext) -> str | None:
    return client_ip(ctx) or None


def _header(name: str) -> Part:
    def part(ctx: RequestContext) -> str | None:
        # two copies are 400: a limit keyed on the first while the upstream reads the last
        # would give an attacker a fresh bucket per request
        return ctx.head.get_single_header(name) or None

    return part


def _claim(name: str) -> Part:
    def part(ctx: RequestContext) -> str | None:
        claims = ctx.claims
        value = claims.get(name) if claims is not None else None
        if value is None:
            return None
        if isinstance(value, str):
            return value or None
        # compact JSON, as forwarded claims are spelled (true, not Python's True)
        return json.dumps(value, separators=(",", ":"), sort_keys=True)

    return part


def _sans(ctx: RequestContext) -> str | None:
    sans = ctx.peer.client_sans
    return ",".join(sans) if sans else None


def _consumer(ctx: RequestContext) -> str | None:
    return ctx.consumer or None


def identity_part(kind: str) -> Part:
    """The part reading `kind` (client_ip, header:NAME, jwt:CLAIM, mtls:san or consumer) from a
    request; built once, when the stage is."""
    if kind == "client_ip":
        return _address
    if kind == "consumer":
        return _consumer
    if kind == "mtls:san":
        return _sans
    if kind.startswith("header:"):
        return _header(kind.removeprefix("header:"))
    if kind.startswith("jwt:"):
        return _claim(kind.removeprefix("jwt:"))
    raise AssertionError(f"unknown identity kind {kind!r}")  # the loader refuses it
