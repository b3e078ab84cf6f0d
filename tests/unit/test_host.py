"""gateway.http.host: one normalized Host, or 400."""

from __future__ import annotations

import pytest

from gateway.errors import BadRequest
from gateway.http import host
from gateway.http.host import normalize_host


@pytest.mark.parametrize(
    ("raw", "forwarded", "name"),
    [
        (b"api.example.com", b"api.example.com", "api.example.com"),
        (b"API.Example.Com", b"api.example.com", "api.example.com"),
        (b"api.example.com ", b"api.example.com", "api.example.com"),
        (b"\tapi.example.com\t ", b"api.example.com", "api.example.com"),
        (b"api.example.com.", b"api.example.com", "api.example.com"),
        (b"api.example.com.:8080", b"api.example.com:8080", "api.example.com"),
        (b"api.example.com:", b"api.example.com:", "api.example.com"),
        (b"127.0.0.1:80", b"127.0.0.1:80", "127.0.0.1"),
        (b"[::1]", b"[::1]", "::1"),
        (b"[0:0:0::1]:8443", b"[::1]:8443", "::1"),
        (b"[2001:DB8::1]", b"[2001:db8::1]", "2001:db8::1"),
        (b"under_score.internal", b"under_score.internal", "under_score.internal"),
        (b"", b"", ""),
        (b"  ", b"", ""),
    ],
)
def test_valid_hosts(raw: bytes, forwarded: bytes, name: str) -> None:
    assert normalize_host(raw) == (forwarded, name)


@pytest.mark.parametrize(
    "raw",
    [
        b"a,b",
        b"a b",
        b"a;b",
        b"a@b",
        b"a/b",
        b"%61",
        b"a..b",
        b"a..",
        b"api.example.com..",
        b"api.example.com..:80",
        b".a",
        b".",
        b":80",
        b"a:8o",
        b"a:123456",
        b"a:65536",
        b"a:1:2",
        b"[::1",
        b"[::g]",
        b"[::1]x",
        b"[::1]:x",
        b"::1",
        b"a]",
        b"a[b",
        b"\xe9.example",
        b"a\x00b",
        b"a\rb",
    ],
)
def test_invalid_hosts(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        normalize_host(raw)


def test_the_cache_is_bounded() -> None:
    for i in range(5000):
        normalize_host(b"h%d.example" % i)
    assert len(host._cache) <= 1024
