"""The `compress` stage's pure parts: the coding chosen for an Accept-Encoding value, the header
edits, the encoders' per-chunk flush, and the config's errors at their YAML paths."""

from __future__ import annotations

import zlib

import brotli
import pytest

from gateway.errors import ConfigErrors
from gateway.stages.compress import CompressConfig, _edited, choose_coding, encoder
from tests.support.config import MINIMAL, config_errors, parse_config

BASE = MINIMAL

BOTH = ("br", "gzip")


@pytest.mark.parametrize(
    ("accept", "offered", "chosen"),
    [
        (b"gzip, deflate, br", BOTH, "br"),  # a tie: our order
        (b"gzip, deflate, br", ("gzip", "br"), "gzip"),
        (b"gzip", BOTH, "gzip"),
        (b"br;q=0.5, gzip;q=0.8", BOTH, "gzip"),  # the client's weights first
        (b"br;q=0, gzip", BOTH, "gzip"),  # q=0: refused
        (b"br;q=0, gzip;q=0", BOTH, None),
        (b"*", BOTH, "br"),
        (b"*;q=0.1, br;q=0", BOTH, "gzip"),  # * stands for what is not named
        (b"*;q=0", BOTH, None),
        (b"identity", BOTH, None),
        (b"identity;q=0", BOTH, None),  # nothing acceptable offered: sent as it is
        (b"identity;q=0, gzip", BOTH, "gzip"),
        (b"x-gzip", BOTH, "gzip"),
        (b"GZIP ; Q=1.0", BOTH, "gzip"),
        (b"deflate, zstd", BOTH, None),
        (b"br;q=abc, gzip;q=0.1", BOTH, "gzip"),  # an unreadable weight is a refusal
        (b"br;q=2, gzip;q=0.1", BOTH, "gzip"),
        (b"", BOTH, None),
        (b" , ,", BOTH, None),
    ],
)
def test_the_coding_follows_the_clients_weights(
    accept: bytes, offered: tuple[str, ...], chosen: str | None
) -> None:
    assert choose_coding(accept, offered) == chosen


def test_headers_of_a_compressed_response() -> None:
    headers = [
        (b"Content-Type", b"text/html"),
        (b"ETag", b'"v1"'),
        (b"Vary", b"Origin"),
        (b"Accept-Ranges", b"bytes"),
        (b"Vary", b"Cookie"),
    ]
    assert _edited(headers, "br") == [
        (b"Content-Type", b"text/html"),
        (b"ETag", b'W/"v1"'),
        (b"Vary", b"Origin, Accept-Encoding"),  # merged into the first Vary line
        (b"Vary", b"Cookie"),
        (b"Content-Encoding", b"br"),
    ]
    # already weak; Vary already names it (any case), or * covers it
    assert _edited([(b"etag", b'W/"v1"'), (b"vary", b"accept-encoding")], "gzip") == [
        (b"etag", b'W/"v1"'),
        (b"vary", b"accept-encoding"),
        (b"Content-Encoding", b"gzip"),
    ]
    assert _edited([(b"Vary", b"*")], None) == [(b"Vary", b"*")]
    # a client that accepts no coding: Vary only, the representation untouched
    assert _edited([(b"ETag", b'"v1"'), (b"Accept-Ranges", b"bytes")], None) == [
        (b"ETag", b'"v1"'),
        (b"Accept-Ranges", b"bytes"),
        (b"Vary", b"Accept-Encoding"),
    ]


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_each_chunk_is_decodable_on_its_own(coding: str) -> None:
    """A flushed chunk decodes to everything sent so far: what makes SSE work through it."""
    enc = encoder(coding, CompressConfig())
    if coding == "gzip":
        z = zlib.decompressobj(31)
        decode = z.decompress
    else:
        d = brotli.Decompressor()
        decode = d.process
    seen = b""
    for i in range(5):
        part = b"event: tick\ndata: %d\n\n" % i
        seen += decode(enc.chunk(part))
        assert seen.endswith(part)
    decode(enc.finish())
    if coding == "gzip":
        assert z.eof
    else:
        assert d.is_finished()


def compress_config(yaml_value: str) -> CompressConfig:
    config = parse_config(
        BASE
        + f"routes:\n  - name: r\n    upstream: u\n    pipeline:\n      - compress: {yaml_value}\n",
        env={},
    )
    stage = config.routes[0].pipeline[0].config
    assert isinstance(stage, CompressConfig)
    return stage


def errors_of(value: str) -> list[str]:
    text = (
        BASE + f"routes:\n  - name: r\n    upstream: u\n    pipeline:\n      - compress: {value}\n"
    )
    return config_errors(text)


def test_defaults_and_normalized_types() -> None:
    assert compress_config("{}") == CompressConfig()
    config = compress_config(
        "{types: [Text/*, application/JSON], min_bytes: 4KiB, encodings: [gzip]}"
    )
    assert config.types == ("text/*", "application/json")
    assert config.min_bytes == 4096
    assert config.encodings == ("gzip",)


def test_errors_name_their_paths() -> None:
    where = "routes[0].pipeline[0].compress"
    assert errors_of("{encodings: [gzip, zstd]}") == [
        f"{where}.encodings[1]: unknown coding 'zstd'; codings: br, gzip"
    ]
    assert errors_of("{encodings: [gzip, gzip]}") == [f"{where}.encodings[1]: gzip is listed twice"]
    assert errors_of("{encodings: []}") == [
        f"{where}.encodings: must list at least one of br, gzip"
    ]
    assert errors_of("{types: [json]}") == [
        f"{where}.types[0]: 'json' is not a media type (type/subtype or type/*)"
    ]
    assert errors_of('{types: ["*/*"]}') == [
        f"{where}.types[0]: '*/*' is not a media type (type/subtype or type/*)"
    ]
    assert errors_of("{min_bytes: lots}") == [
        f"{where}.min_bytes: must be a size in bytes or with a unit (KiB, MiB, GiB), not 'lots'"
    ]
    assert errors_of("{gzip_level: 0, br_quality: 12}") == [
        f"{where}.gzip_level: must be 1 to 9",
        f"{where}.br_quality: must be 0 to 11",
    ]
    assert errors_of("{level: 5}") == [f"{where}.level: unknown key (did you mean 'gzip_level'?)"]


def test_it_comes_before_idempotency_and_once() -> None:
    text = BASE + "routes:\n  - name: r\n    upstream: u\n    pipeline:\n"
    with pytest.raises(ConfigErrors) as info:
        parse_config(
            text + "      - idempotency: {required: false}\n"
            "      - compress: {}\n      - compress: {}\n",
            env={},
        )
    assert [str(e) for e in info.value.errors] == [
        "routes[0].pipeline[1]: compress must come before idempotency: a replayed"
        " response would keep the coding of the first request, whatever the next client accepts",
        "routes[0].pipeline[2]: compress must come before idempotency: a replayed"
        " response would keep the coding of the first request, whatever the next client accepts",
        "routes[0].pipeline[2]: a route has one compress stage: a second would compress twice",
    ]
    config = parse_config(
        text + "      - compress: {}\n      - idempotency: {required: false}\n", env={}
    )
    assert [s.kind for s in config.routes[0].pipeline] == ["compress", "idempotency"]
