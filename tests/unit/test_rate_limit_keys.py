"""How the rate_limit stage builds a request's key, and its policy header."""

from __future__ import annotations

from gateway.http.messages import RequestHead
from gateway.stages.rate_limit import RateLimitConfig, key_function, policy_window
from tests.support.context import make_context, make_snapshot

TRUSTING = """
listeners: [{name: http, bind: "127.0.0.1:0"}]
trusted_proxies: [10.0.0.0/8]
routes:
  - {name: app, match: {path_prefix: /}, upstream: internal:echo}
"""


def _head(*headers: tuple[bytes, bytes], xff: bytes | None = None) -> RequestHead:
    head = RequestHead()
    head.replace_headers(list(headers))
    head.x_forwarded_for = xff
    return head


async def test_single_kinds() -> None:
    ctx = make_context(_head((b"X-Api-Key", b"k1")), ip="192.0.2.7")
    ctx.claims = {"sub": "alice", "n": 7}
    ctx.peer.client_sans = ("spiffe://corp/a", "a.corp")
    assert key_function(["client_ip"])(ctx) == "192.0.2.7"
    assert key_function(["route"])(ctx) == "app"
    assert key_function(["header:x-api-key"])(ctx) == "k1"
    assert key_function(["jwt:sub"])(ctx) == "alice"
    assert key_function(["jwt:n"])(ctx) == "7"
    assert key_function(["mtls:san"])(ctx) == "spiffe://corp/a,a.corp"


async def test_missing_parts_are_empty_and_composites_keep_them_apart() -> None:
    ctx = make_context(_head(), ip="192.0.2.7")
    both = key_function(["client_ip", "header:x-api-key", "jwt:sub", "mtls:san"])
    assert both(ctx) == "9:192.0.2.70:0:0:"
    with_key = make_context(_head((b"x-api-key", b"k")), ip="192.0.2.7")
    assert both(with_key) == "9:192.0.2.71:k0:0:"


async def test_composite_parts_cannot_run_into_each_other() -> None:
    """A claim may hold any character: no separator keeps two composites apart, lengths do."""
    key = key_function(["jwt:a", "jwt:b"])
    one = make_context(_head(), ip="192.0.2.7")
    one.claims = {"a": "x\x1fy", "b": "z"}
    two = make_context(_head(), ip="192.0.2.7")
    two.claims = {"a": "x", "b": "y\x1fz"}
    assert key(one) != key(two)


async def test_client_ip_behind_trusted_proxies_is_the_nearest_untrusted_hop() -> None:
    snapshot = make_snapshot(TRUSTING)
    key = key_function(["client_ip"])
    chain = _head(xff=b"203.0.113.9, 198.51.100.4, 10.1.1.1")
    assert key(make_context(chain, snapshot=snapshot, ip="10.0.0.5", trusted=True)) == (
        "198.51.100.4"
    )
    # from an untrusted peer the header is not believed
    assert key(make_context(chain, snapshot=snapshot, ip="192.0.2.7")) == "192.0.2.7"
    # a malformed hop ends the walk at the trusted peer itself
    bad = _head(xff=b"203.0.113.9, not-an-ip")
    assert key(make_context(bad, snapshot=snapshot, ip="10.0.0.5", trusted=True)) == "10.0.0.5"
    # every hop trusted: the first one
    inner = _head(xff=b"10.2.2.2, 10.3.3.3")
    assert key(make_context(inner, snapshot=snapshot, ip="10.0.0.5", trusted=True)) == "10.2.2.2"


def test_policy_window_in_whole_seconds() -> None:
    assert policy_window(RateLimitConfig(rate=100, per=1.0, burst=1)) == (100, 1)
    assert policy_window(RateLimitConfig(rate=5, per=60.0, burst=1)) == (5, 60)
    assert policy_window(RateLimitConfig(rate=10, per=0.5, burst=1)) == (20, 1)


async def test_non_string_claims_are_spelled_as_json() -> None:
    """As forwarded claims are: `true`, not Python's `True` (found by probing)."""
    ctx = make_context(_head(), ip="192.0.2.7")
    ctx.claims = {"flag": True, "roles": ["b", "a"], "n": 7}
    assert key_function(["jwt:flag"])(ctx) == "true"
    assert key_function(["jwt:roles"])(ctx) == '["b","a"]'
    assert key_function(["jwt:n"])(ctx) == "7"
