"""gateway.http.path: request-target normalization (SPEC §3)."""

from __future__ import annotations

import itertools

import pytest

from gateway.errors import BadRequest
from gateway.http.path import normalize_target


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/", ("/", "")),
        (b"/api/users/123", ("/api/users/123", "")),
        (b"/api/users/123?x=1", ("/api/users/123", "x=1")),
        (b"/api?", ("/api", "")),
        (b"/api?a=1?b=2", ("/api", "a=1?b=2")),
        (b"/a-b_c~d/e:f@g!$&'()*+,;=", ("/a-b_c~d/e:f@g!$&'()*+,;=", "")),
        (b"/file.tar.gz", ("/file.tar.gz", "")),
        (b"/.well-known/acme", ("/.well-known/acme", "")),
        (b"/a/...", ("/a/...", "")),
        (b"/a/..b/c", ("/a/..b/c", "")),
    ],
)
def test_plain_origin_form_is_returned_as_is(target: bytes, expected: tuple[str, str]) -> None:
    assert normalize_target(target) == expected


@pytest.mark.parametrize(
    ("target", "path"),
    [
        # the spellings SPEC §3 names: each must route exactly like "/api"
        (b"/./api", "/api"),
        (b"/x/../api", "/api"),
        (b"/%2e/api", "/api"),
        (b"/%2E/api", "/api"),
        (b"/x/%2e%2e/api", "/api"),
        (b"/x/%2E%2E/api", "/api"),
        (b"/x/.%2e/api", "/api"),
        (b"//api", "/api"),
        (b"///api//", "/api/"),
        (b"/a//b///c", "/a/b/c"),
        (b"/a/./b/./c", "/a/b/c"),
        (b"/a/b/../../c", "/c"),
        (b"/a/b/c/../../../api", "/api"),
        # a trailing slash names a directory and is kept
        (b"/api/", "/api/"),
        (b"/api/.", "/api/"),
        (b"/api/./", "/api/"),
        (b"/api/x/..", "/api/"),
        (b"/api/x/../", "/api/"),
        (b"/api/..", "/"),
        (b"/.", "/"),
        (b"/./", "/"),
        (b"//", "/"),
    ],
)
def test_dot_segments_and_repeated_slashes_are_resolved(target: bytes, path: str) -> None:
    assert normalize_target(target) == (path, "")


@pytest.mark.parametrize(
    ("target", "path"),
    [
        (b"/%41%5a%61%7a%30%39", "/AZaz09"),
        (b"/%2d%2E%5f%7E", "/-._~"),
        (b"/%7euser", "/~user"),
        # reserved and non-ASCII escapes stay encoded, in upper case
        (b"/a%3fb", "/a%3Fb"),
        (b"/a%3Fb", "/a%3Fb"),
        (b"/a%20b", "/a%20b"),
        (b"/caf%c3%a9", "/caf%C3%A9"),
        (b"/a%2525", "/a%2525"),
        (b"/a%23b", "/a%23b"),
    ],
)
def test_only_unreserved_escapes_are_decoded(target: bytes, path: str) -> None:
    assert normalize_target(target) == (path, "")


def test_percent_decoding_happens_once() -> None:
    # "%252e" is an encoded "%2e", not a dot: decoding twice would turn it into a segment
    assert normalize_target(b"/a/%252e%252e/b") == ("/a/%252e%252e/b", "")


@pytest.mark.parametrize(
    ("target", "detail"),
    [
        (b"/api%2Fx", "%2F"),
        (b"/api%2fx", "%2F"),
        (b"/api%5Cx", "%5C"),
        (b"/api%5cx", "%5C"),
        (b"/x/%2e%2e%2fapi", "%2F"),
        (b"/api\\x", "backslash"),
        (b"/a%00", "%00"),
        (b"/a\x00b", "NUL"),
        (b"/a b", "0x20"),
        (b"/a\tb", "0x09"),
        (b"/a\x7fb", "0x7F"),
        (b"/a\x01", "0x01"),
        (b"/caf\xc3\xa9", "non-ASCII"),
        (b"/\xff", "non-ASCII"),
        (b"/a#frag", "fragment"),
        (b"/%zz", "'%zz'"),
        (b"/%4", "'%4'"),
        (b"/a%", "'%'"),
        (b"/%g0", "'%g0'"),
        (b"/%+f", "'%+f'"),
        (b"/% f", "0x20"),
        (b"/..", "above the root"),
        (b"/../api", "above the root"),
        (b"/%2e%2e/api", "above the root"),
        (b"/%2E%2E/api", "above the root"),
        (b"/a/../../api", "above the root"),
        (b"/a/b/../../..", "above the root"),
    ],
)
def test_refused_paths(target: bytes, detail: str) -> None:
    with pytest.raises(BadRequest) as info:
        normalize_target(target)
    assert detail in info.value.detail
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("target", "detail"),
    [
        (b"/a?x=\x00", "NUL"),
        (b"/a?x=1 2", "0x20"),
        (b"/a?x=\x7f", "0x7F"),
        (b"/a?x=\xc3\xa9", "non-ASCII"),
        (b"/./a?x=\xc3\xa9", "non-ASCII"),
    ],
)
def test_refused_queries(target: bytes, detail: str) -> None:
    with pytest.raises(BadRequest, match="query string") as info:
        normalize_target(target)
    assert detail in info.value.detail


@pytest.mark.parametrize(
    "query",
    [b"a=%zz", b"a=%2F&b=%5c", b"a=/../b", b"a=\\", b"a=#b", b"x=1&&y=%41", b"a=%2e%2e//x"],
)
def test_the_query_is_passed_through_untouched(query: bytes) -> None:
    assert normalize_target(b"/p?" + query) == ("/p", query.decode())
    assert normalize_target(b"//p/./?" + query) == ("/p/", query.decode())


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"http://other.example/x?y=1", ("/x", "y=1")),
        (b"http://other.example:8080/a/b", ("/a/b", "")),
        (b"https://other.example/a/", ("/a/", "")),
        (b"HTTP://Other.Example/a", ("/a", "")),
        (b"http://other.example", ("/", "")),
        (b"http://other.example?q", ("/", "q")),
        (b"http://user@other.example/a", ("/a", "")),
        (b"http://[::1]:8080/a", ("/a", "")),
        # the path of an absolute-form target is normalized like any other
        (b"http://other.example//x/../%2e/api", ("/api", "")),
    ],
)
def test_absolute_form_yields_its_path(target: bytes, expected: tuple[str, str]) -> None:
    assert normalize_target(target) == expected


@pytest.mark.parametrize(
    ("target", "detail"),
    [
        (b"*", "OPTIONS *"),
        (b"example.com:443", "absolute path"),
        (b"api/users", "absolute path"),
        (b"ftp://example.com/x", "absolute path"),
        (b"http:/x", "absolute path"),
        (b"http:///x", "empty authority"),
        (b"http://ex\xc3\xa9/x", "non-ASCII"),
        (b"http://a b/x", "0x20"),
        (b"http://other.example/a%2Fb", "%2F"),
        (b"http://other.example/..", "above the root"),
        (b"", "empty"),
        (b"?x=1", "empty"),
    ],
)
def test_refused_target_forms(target: bytes, detail: str) -> None:
    with pytest.raises(BadRequest) as info:
        normalize_target(target)
    assert detail in info.value.detail


_PIECES = ["", "a", ".", "..", "%2e", "%2E%2e", "%41", "%3f", "b.c", "~"]


def test_normalization_is_idempotent_and_canonical() -> None:
    """Every spelling built from these pieces either fails or yields a fixed point."""
    checked = 0
    for pieces in itertools.product(_PIECES, repeat=4):
        target = ("/" + "/".join(pieces)).encode()
        try:
            path, _ = normalize_target(target)
        except BadRequest:
            continue
        checked += 1
        assert normalize_target(path.encode()) == (path, ""), target
        assert path.startswith("/")
        assert "//" not in path
        assert not any(s in {".", ".."} for s in path.split("/")), target
        assert "%2e" not in path.lower()
        assert "%41" not in path
    assert checked > 1000


def test_a_repeated_target_gets_the_same_answer_and_the_memo_stays_bounded() -> None:
    from gateway.http import path

    path._SPLIT.clear()
    targets = [b"/", b"/api/users/123?x=1", b"/a//b/./c", b"/a%41b?q", b"/p;x", b"/a%25b"]
    first = [path.split_target(t) for t in targets]
    assert set(path._SPLIT) == set(targets)  # each answer kept
    assert [path.split_target(t) for t in targets] == first  # and given again unchanged
    assert first[2] == ("/a/b/c", "", False, 0)
    assert first[4][3] == path.PATH_SEMICOLON
    assert first[5][3] == path.PATH_ESCAPED_PERCENT
    # a long target is answered but not kept: the memo holds at most ~1 MiB of targets
    long_target = b"/" + b"a" * 300
    assert path.split_target(long_target) == ("/" + "a" * 300, "", True, 0)
    assert long_target not in path._SPLIT
    # targets that never repeat: the memo is emptied when full, never grows past its bound
    for i in range(2 * path._SPLIT_ENTRIES + 7):
        path.split_target(b"/items/%d" % i)
        assert len(path._SPLIT) <= path._SPLIT_ENTRIES
    assert path.split_target(b"/") == first[0]


def test_a_refused_target_is_refused_every_time() -> None:
    for _ in range(3):
        with pytest.raises(BadRequest, match="%2F"):
            normalize_target(b"/a%2Fb")
