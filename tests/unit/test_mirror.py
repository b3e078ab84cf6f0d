"""The `mirror` stage's config (defaults, errors with their YAML paths, the upstream checked
against the declared ones, its place in a pipeline) and the `RequestBody` hook that copies a
body as it arrives."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import ConfigErrors, PayloadTooLarge
from gateway.http.messages import RequestBody
from gateway.stages.mirror import MirrorConfig
from tests.support.config import parse_config

BASE = """
listeners: [{name: http, bind: "127.0.0.1:8080"}]
upstreams:
  u: {endpoints: [{url: "http://127.0.0.1:9001"}]}
  shadow: {endpoints: [{url: "http://127.0.0.1:9002"}]}
"""
WHERE = "routes[0].pipeline[0].mirror"


def _route(*entries: str) -> str:
    lines = "".join(f"      - {e}\n" for e in entries)
    return BASE + f"routes:\n  - name: r\n    upstream: u\n    pipeline:\n{lines}"


def mirror_config(value: str) -> MirrorConfig:
    config = parse_config(_route(f"mirror: {value}"), env={})
    stage = config.routes[0].pipeline[0].config
    assert isinstance(stage, MirrorConfig)
    return stage


def errors_of(*entries: str) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        parse_config(_route(*entries), env={})
    return [str(e) for e in info.value.errors]


def test_defaults() -> None:
    assert mirror_config("{upstream: shadow}") == MirrorConfig(
        upstream="shadow", sample_ratio=1.0, max_body_bytes=65536, max_in_flight=100
    )
    config = mirror_config("{upstream: shadow, sample_ratio: 0, max_body_bytes: 1MiB}")
    assert config.sample_ratio == 0.0
    assert config.max_body_bytes == 1024 * 1024


def test_errors_name_their_paths() -> None:
    assert errors_of("mirror: {upstream: shadw}") == [
        f"{WHERE}.upstream: unknown upstream 'shadw'; upstreams: shadow, u"
    ]
    assert errors_of("mirror: {}") == [f"{WHERE}.upstream: is required"]
    assert errors_of("mirror: {upstream: shadow, sample_ratio: 1.5}") == [
        f"{WHERE}.sample_ratio: must be from 0 to 1, not 1.5"
    ]
    assert errors_of("mirror: {upstream: shadow, sample_ratio: yes}") == [
        f"{WHERE}.sample_ratio: must be a number from 0 to 1"
    ]
    assert errors_of("mirror: {upstream: shadow, max_in_flight: 0}") == [
        f"{WHERE}.max_in_flight: must be at least 1"
    ]


def test_an_unknown_upstream_in_a_middleware_is_reported_at_its_path() -> None:
    text = BASE + "middlewares:\n  shadowing:\n    mirror: {upstream: nope}\n"
    with pytest.raises(ConfigErrors) as info:
        parse_config(text, env={})
    assert [str(e) for e in info.value.errors] == [
        "middlewares.shadowing.mirror.upstream: unknown upstream 'nope'; upstreams: shadow, u"
    ]


def test_it_comes_before_retry_and_once() -> None:
    assert errors_of(
        "retry: {attempts: 2}", "mirror: {upstream: shadow}", "mirror: {upstream: shadow}"
    ) == [
        "routes[0].pipeline[1]: mirror must come before retry: each try would send the mirror a"
        " copy",
        "routes[0].pipeline[2]: a route has one mirror stage: each copy would be sent by both",
        "routes[0].pipeline[2]: mirror must come before retry: each try would send the mirror a"
        " copy",
    ]
    config = parse_config(_route("mirror: {upstream: shadow}", "retry: {attempts: 2}"), env={})
    assert [s.kind for s in config.routes[0].pipeline] == ["mirror", "retry"]


class _Producer:
    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Copier:
    def __init__(self, limit: int = 1 << 20) -> None:
        self.chunks: list[bytes] = []
        self.ended = 0
        self.failures = 0
        self.limit = limit

    def chunk(self, data: bytes) -> bool:
        self.chunks.append(data)
        return sum(map(len, self.chunks)) <= self.limit

    def end(self) -> None:
        self.ended += 1

    def failed(self) -> None:
        self.failures += 1


async def test_a_copier_sees_the_buffered_chunks_then_each_new_one_then_the_end() -> None:
    body = RequestBody(asyncio.get_running_loop(), _Producer(), limit=1000, timeout=5)
    body.feed(b"ab")
    copier = _Copier()
    body.attach(copier)
    assert copier.chunks == [b"ab"]
    body.feed(b"cd")
    assert copier.chunks == [b"ab", b"cd"]
    # the reader is not affected: it gets every chunk
    assert await body.read() == b"ab"
    body.feed_eof()
    assert copier.ended == 1
    assert body.copier is None
    assert await body.read() == b"cd"
    assert await body.read() == b""


async def test_a_complete_body_is_handed_over_at_once() -> None:
    body = RequestBody(asyncio.get_running_loop(), _Producer(), limit=1000, timeout=5)
    body.feed(b"ab")
    body.feed(b"cd")
    body.feed_eof()
    copier = _Copier()
    body.attach(copier)
    assert (copier.chunks, copier.ended, body.copier) == ([b"ab", b"cd"], 1, None)
    assert body.take_all() == b"abcd"


async def test_a_copier_that_wants_no_more_is_told_nothing_more() -> None:
    body = RequestBody(asyncio.get_running_loop(), _Producer(), limit=1000, timeout=5)
    copier = _Copier(limit=3)
    body.attach(copier)
    body.feed(b"ab")
    body.feed(b"cd")  # past its limit: detached
    assert body.copier is None
    body.feed(b"ef")
    body.feed_eof()
    assert (copier.chunks, copier.ended, copier.failures) == ([b"ab", b"cd"], 0, 0)
    assert body.take_all() == b"abcdef"


async def test_a_failed_body_fails_the_copy() -> None:
    body = RequestBody(asyncio.get_running_loop(), _Producer(), limit=4, timeout=5)
    copier = _Copier()
    body.attach(copier)
    body.feed(b"abcdef")  # over the body's own limit
    assert (copier.failures, body.copier) == (1, None)
    with pytest.raises(PayloadTooLarge):
        body.check()
    late = _Copier()
    body.attach(late)
    assert (late.chunks, late.failures) == ([], 1)
