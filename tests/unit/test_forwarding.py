"""The request head sent upstream: what is dropped, what is set, how the body is framed."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.http import headers
from gateway.http.forwarding import build_request_head, upstream_path, upstream_target
from gateway.http.headers import (
    DROP,
    DROP_UNTRUSTED,
    PARSED,
    PARSED_NAMES,
    PARSED_SHIFT,
    READ_CONNECTION,
    READ_FORWARDED_FOR,
    READ_HOST,
    READ_TRACEPARENT,
    TRACE,
    UNDERSCORE,
    name_class,
    received_name_class,
)
from gateway.http.messages import RequestHead
from gateway.http.path import split_target


@pytest.mark.parametrize(
    ("path", "prefix", "expected"),
    [
        ("/svc", "/svc", "/"),
        ("/svc/x", "/svc", "/x"),
        ("/svcx", "/svc", "/svcx"),
        ("/other", "/svc", "/other"),
        ("/a/b", None, "/a/b"),
        ("/a/b", "/", "/a/b"),
    ],
)
def test_strip_prefix_on_segment_boundaries(path: str, prefix: str | None, expected: str) -> None:
    assert upstream_path(path, prefix) == expected


def _build(head: RequestHead, target: bytes, *, trusted: bool = False, **framing: Any) -> bytes:
    return build_request_head(
        head,
        target,
        client=b"192.0.2.7",
        trusted_peer=trusted,
        scheme=b"http",
        request_id=b"rid-1",
        **framing,
    )


def _head(*headers: tuple[bytes, bytes], **fields: Any) -> RequestHead:
    head = RequestHead()
    head.method = "POST"
    head.raw_method = b"POST"
    head.query = "a=1"
    head.replace_headers(list(headers))
    for key, value in fields.items():
        setattr(head, key, value)
    return head


def _lines(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\r\n\r\n")
    return raw[:-4].split(b"\r\n")


def test_head_drops_hop_by_hop_and_spoofable_headers() -> None:
    """(Headers the client names in Connection are removed on arrival by the server protocol:
    tests/integration/test_pipeline_headers.py.)"""
    head = _head(
        (b"Host", b"api.test"),
        (b"X-Keep", b"1"),
        (b"Connection", b"close, Host"),
        (b"Transfer-Encoding", b"chunked"),
        (b"X-Forwarded-Proto", b"https"),
        (b"Client-Cert", b":abc:"),
        (b"Expect", b"100-continue"),
        host=b"api.test",
        connection_tokens={b"close", b"host"},
        x_forwarded_for=b"198.51.100.1",
    )
    lines = _lines(_build(head, b"/x?a=1", content_length=3, chunked=False))
    assert lines[0] == b"POST /x?a=1 HTTP/1.1"
    assert b"X-Keep: 1" in lines
    assert b"Host: api.test" in lines  # naming Host in Connection cannot remove it
    assert b"X-Forwarded-Host: api.test" in lines
    assert b"X-Forwarded-For: 192.0.2.7" in lines  # untrusted peer: replaced
    assert b"X-Forwarded-Proto: http" in lines
    assert b"X-Request-Id: rid-1" in lines
    assert b"Content-Length: 3" in lines
    names = [line.split(b":")[0].lower() for line in lines[1:]]
    for dropped in (b"connection", b"transfer-encoding", b"client-cert", b"expect"):
        assert dropped not in names
    assert names.count(b"x-forwarded-proto") == 1


def test_trusted_peer_appends_and_chunked_framing() -> None:
    head = _head(host=b"h", x_forwarded_for=b"198.51.100.1")
    lines = _lines(_build(head, b"/", trusted=True, content_length=None, chunked=True))
    assert b"X-Forwarded-For: 198.51.100.1, 192.0.2.7" in lines
    assert b"Transfer-Encoding: chunked" in lines


def test_missing_host_uses_the_default() -> None:
    lines = _lines(
        _build(_head(), b"/", content_length=None, chunked=False, default_host=b"10.0.0.1:80")
    )
    assert b"Host: 10.0.0.1:80" in lines


@pytest.mark.parametrize(
    ("target", "strip", "expected"),
    [
        (b"/a/b?x=1", None, b"/a/b?x=1"),  # already normal: forwarded as received
        (b"/a/b?", None, b"/a/b?"),
        (b"/svc/b?x=1", "/svc", b"/b?x=1"),
        (b"/a/./b/../c?q", None, b"/a/c?q"),  # normalized, then re-encoded
        (b"/%7euser", None, b"/~user"),
        (b"http://h.test/p?q=1", None, b"/p?q=1"),  # absolute-form becomes origin-form
    ],
)
def test_upstream_target(target: bytes, strip: str | None, expected: bytes) -> None:
    head = RequestHead()
    head.target = target
    head.path, head.query, head.plain_target, head.path_flags = split_target(target)
    assert upstream_target(head, strip) == expected


def test_header_names_are_classified_once_and_by_their_dash_spelling() -> None:
    """name_class: "_" read as "-" (how CGI/WSGI upstreams read it), families by prefix."""
    assert name_class(b"x_forwarded_for") == DROP | UNDERSCORE
    assert name_class(b"x-forwarded-groups") == DROP_UNTRUSTED
    assert name_class(b"x_auth_request_user") == DROP_UNTRUSTED | UNDERSCORE
    assert name_class(b"proxy-anything") == DROP
    assert name_class(b"accept") == 0
    assert name_class(b"my_header") == UNDERSCORE


def test_the_name_cache_is_bounded() -> None:
    for i in range(10_000):
        name_class(b"x-random-%d" % i)
    assert len(headers.NAME_CLASSES) <= 4096


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        (b"X-Forwarded-For", DROP | PARSED | READ_FORWARDED_FOR << PARSED_SHIFT),
        (b"X_FORWARDED_FOR", DROP | UNDERSCORE),  # dropped like it, but not read as it
        (b"HOST", DROP | PARSED | READ_HOST << PARSED_SHIFT),
        (b"Content_Length", DROP | UNDERSCORE),
        (b"TraceParent", TRACE | PARSED | READ_TRACEPARENT << PARSED_SHIFT),
        (b"X-Forwarded-Groups", DROP_UNTRUSTED),
        (b"Accept", 0),
    ],
)
def test_a_received_spelling_classes_as_its_lower_case_name(spelling: bytes, expected: int) -> None:
    """The connection classes each header by the name as spelled (no lower-case copy): any
    spelling gets its lower-case name's bits, the second time from the cache too."""
    assert received_name_class(spelling) == expected == name_class(spelling.lower())
    assert received_name_class(spelling) == expected
    assert headers.RECEIVED_CLASSES[spelling] == expected


def test_each_name_the_connection_reads_has_its_own_number_in_any_spelling() -> None:
    """The connection reads a header by the number above PARSED_SHIFT: thirteen names,
    thirteen numbers, whatever the case the client spelled them in; no other name has one."""
    assert sorted(PARSED_NAMES.values()) == list(range(1, len(PARSED_NAMES) + 1))
    for low, read in PARSED_NAMES.items():
        for spelling in (low, low.upper(), low.title()):
            flags = received_name_class(spelling)
            assert flags & PARSED
            assert flags >> PARSED_SHIFT == read
    for other in (b"accept", b"x_forwarded_for", b"host_", b"x-request-ids", b"hosts"):
        assert received_name_class(other) >> PARSED_SHIFT == 0


def test_the_received_spelling_cache_is_bounded_and_still_right() -> None:
    for i in range(10_000):
        received_name_class(b"X-Spelled-%d" % i)
    assert len(headers.RECEIVED_CLASSES) <= 4096
    assert received_name_class(b"X-FORWARDED-FOR") == (
        DROP | PARSED | READ_FORWARDED_FOR << PARSED_SHIFT
    )


def test_a_head_whose_list_was_set_directly_is_classed_again() -> None:
    """`build_request_head` reads the classes the connection made while parsing; a list set
    without `replace_headers` (a test's, say) is classed again rather than misread."""
    head = RequestHead()
    head.replace_headers([(b"Accept", b"*/*")])
    head.headers = [(b"Accept", b"*/*"), (b"Connection", b"close"), (b"X-Real-IP", b"1.2.3.4")]
    connection = DROP | PARSED | READ_CONNECTION << PARSED_SHIFT
    assert head.header_classes() == [0, connection, DROP_UNTRUSTED]
    request = build_request_head(
        head,
        b"/",
        client=b"10.0.0.1",
        trusted_peer=False,
        scheme=b"http",
        request_id=b"r1",
        content_length=None,
        chunked=False,
    )
    assert b"Accept: */*\r\n" in request
    assert b"close" not in request
    assert b"1.2.3.4" not in request
