"""The `compress` stage (SPEC §5.8): responses compressed with brotli or gzip by Accept-Encoding.

Which coding: the client's `Accept-Encoding` (every copy of the header, RFC 9110 §12.5.3) read
with its q-values; a coding with `q=0` is refused, `*` stands for every coding the client did
not name, `x-gzip` is gzip.  The highest q among the configured `encodings` wins, ties going to
the order of `encodings` (br before gzip by default: smaller at a similar cost).  No
`Accept-Encoding` at all means identity, as nginx and Envoy read it (RFC 9110 would allow any
coding, but clients that send no header are scripts that would not decode it).  When the
client accepts none of them the response goes out as it is, even under `identity;q=0` (a 406
would break more clients than it helps, as in nginx and Envoy).

Which responses: those whose `Content-Type` media type is in `types` (`text/*` covers every
text type), of a status other than 1xx, 204, 206 and 304, without a `Content-Encoding` of their
own (never compressed twice) or `Cache-Control: no-transform`, and of at least `min_bytes` when
their length is known — a `Content-Length`, or a body (chunked or not) that arrived whole with
its head, which the proxy hands on as bytes.  A body of unknown length (chunked or
close-delimited) is compressed whatever its size, as nginx does (`gzip_min_length` reads only
Content-Length): knowing would mean holding its first bytes back, and a small chunked body
costs a few bytes of coding overhead.  HEAD requests and requests with `Range` are passed
through untouched (a range of the compressed form is not what the client asked for).

What changes: `Content-Encoding` is set, the upstream's length is dropped (a streamed body goes
out chunked; a body already here whole is compressed at once and sent with its new length), a
strong `ETag` becomes weak (`W/`: the bytes differ from the upstream's, RFC 9110 §8.8.1), and
`Accept-Ranges` is dropped.  Every response the stage could compress for some client — the type,
status and size match — gets `Accept-Encoding` in `Vary` (merged into the upstream's first Vary
line), whether or not this client accepted a coding, so a shared cache keys on it.

Streaming: a streamed body is compressed chunk by chunk as the upstream sends it, each chunk
flushed (gzip's sync flush, brotli's flush) so a server-sent-events stream or a long download
reaches the client as it is produced, never held until the end.  Back-pressure is the proxy's
own: a client that reads slowly pauses the upstream through the wrapped stream.  Compression runs
on the event loop (the measured cost per byte is in the README): a chunk at a time, at most the
upstream connection's read size.

Request bodies are never decompressed: a `Content-Encoding` on a request passes to the upstream
as sent (a zip bomb is the upstream's to refuse, within the route's max_body_bytes of
compressed bytes).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, final

import brotli

from gateway.config.model import StageSpec
from gateway.config.reader import Fields, Reader, as_int, str_list
from gateway.config.stages import PipelineCheck
from gateway.config.units import parse_size
from gateway.errors import ConfigError
from gateway.http.messages import BodySink, BodyStream, Response
from gateway.observability.instruments import Counter
from gateway.pipeline import Next, RequestContext
from gateway.stages.kind import BuildContext, StageKind
from gateway.stages.outcomes import StageOutcomes

#: the codings the stage can produce, by the name they have in Accept-Encoding
CODINGS: Final = ("br", "gzip")

DEFAULT_TYPES: Final = ("text/*", "application/json", "application/javascript", "image/svg+xml")


@dataclass(frozen=True, slots=True, kw_only=True)
class CompressConfig:
    #: media types (lower case) or `type/*`
    types: tuple[str, ...] = DEFAULT_TYPES
    #: responses of a known length below this are sent as they are
    min_bytes: int = 1024
    #: the codings offered, preferred first when the client's q-values tie
    encodings: tuple[str, ...] = ("br", "gzip")
    #: zlib level 1-9: 6 is zlib's default, within 5% of level 9's size at several times its
    #: speed (measured in the README)
    gzip_level: int = 6
    #: brotli quality 0-11: 4 is about as fast as gzip 6 or faster; 5 and above halve the speed
    #: for 10-15% less (compression runs on the event loop, so its cost is latency for all)
    br_quality: int = 4


EXAMPLE: Final = """\
types: [text/*, application/json, application/javascript, image/svg+xml]
min_bytes: 1KiB
encodings: [br, gzip]
gzip_level: 6
br_quality: 4
"""

_MEDIA_TYPE: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789!#$&-^_.+")


def _types(value: object, path: str) -> tuple[str, ...]:
    items = str_list(value, path)
    if not items:
        raise ConfigError(path, "must list at least one media type, e.g. [text/*]")
    result: list[str] = []
    for i, item in enumerate(items):
        low = item.strip().lower()
        main, slash, sub = low.partition("/")
        if (
            not slash
            or not main
            or not sub
            or not set(main) <= _MEDIA_TYPE
            or not (sub == "*" or set(sub) <= _MEDIA_TYPE)
        ):
            raise ConfigError(
                f"{path}[{i}]", f"{item!r} is not a media type (type/subtype or type/*)"
            )
        if low not in result:
            result.append(low)
    return tuple(result)


def _encodings(value: object, path: str) -> tuple[str, ...]:
    items = str_list(value, path)
    if not items:
        raise ConfigError(path, f"must list at least one of {', '.join(CODINGS)}")
    result: list[str] = []
    for i, item in enumerate(items):
        if item not in CODINGS:
            raise ConfigError(
                f"{path}[{i}]", f"unknown coding {item!r}; codings: {', '.join(CODINGS)}"
            )
        if item in result:
            raise ConfigError(f"{path}[{i}]", f"{item} is listed twice")
        result.append(item)
    return tuple(result)


def _level(low: int, high: int) -> Callable[[object, str], int]:
    def convert(value: object, path: str) -> int:
        level = as_int(value, path)
        if not low <= level <= high:
            raise ConfigError(path, f"must be {low} to {high}")
        return level

    return convert


_FIELDS: Final = Fields(
    CompressConfig,
    {
        "types": _types,
        "min_bytes": parse_size,
        "encodings": _encodings,
        "gzip_level": _level(1, 9),
        "br_quality": _level(0, 11),
    },
)


def _check(check: PipelineCheck, config: CompressConfig) -> CompressConfig:
    if "idempotency" in check.kinds_before:
        # the stored response would be replayed in the coding the first client accepted
        check.error(
            "compress must come before idempotency: a replayed response would keep the coding"
            " of the first request, whatever the next client accepts"
        )
    if "compress" in check.kinds_before:
        check.error("a route has one compress stage: a second would compress twice")
    return config


def _describe(config: CompressConfig) -> dict[str, Any]:
    return {"encodings": list(config.encodings), "min_bytes": config.min_bytes}


# -- Accept-Encoding ------------------------------------------------------------------------------


def _qvalue(params: list[bytes]) -> float:
    """The q parameter among a coding's parameters (1 without one; 0 when malformed, so a
    coding whose weight cannot be read is not used)."""
    for param in params:
        name, eq, value = param.partition(b"=")
        if eq and name.strip().lower() == b"q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0


def choose_coding(accept: bytes, offered: tuple[str, ...]) -> str | None:
    """The coding of `offered` (in order of preference) to answer an `Accept-Encoding` value
    with, or None for the response as it is."""
    named: dict[str, float] = {}
    star: float | None = None
    for item in accept.split(b","):
        parts = item.split(b";")
        name = parts[0].strip().lower()
        params = parts[1:]
        if not name:
            continue
        q = _qvalue(params)
        if name == b"*":
            star = q
        else:
            text = "gzip" if name == b"x-gzip" else name.decode("latin-1")
            # a coding named twice: its highest weight (clients do not; be lenient)
            named[text] = max(q, named.get(text, 0.0))
    best: str | None = None
    best_q = 0.0
    for coding in offered:
        q = named.get(coding, star if star is not None else 0.0)
        if q > best_q:
            best, best_q = coding, q
    return best


# -- the codings ----------------------------------------------------------------------------------


class Encoder(Protocol):
    """One response's compressor: each chunk in, its compressed bytes out, flushed so that
    they can be decoded without what follows."""

    def chunk(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


@final
class _Gzip:
    __slots__ = ("_z",)

    def __init__(self, level: int) -> None:
        # wbits 31: the gzip wrapper (header and CRC-32 trailer), a 32 KiB window
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)

    def chunk(self, data: bytes) -> bytes:
        z = self._z
        return z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._z.flush(zlib.Z_FINISH)


class _BrotliCompressor(Protocol):
    """What brotli.Compressor offers (the package has no type information)."""

    def process(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...

    def finish(self) -> bytes: ...


@final
class _Brotli:
    __slots__ = ("_c",)

    def __init__(self, quality: int) -> None:
        # lgwin 22 (4 MiB window) is brotli's default; MODE_TEXT suits the default types
        compressor: _BrotliCompressor = brotli.Compressor(mode=brotli.MODE_TEXT, quality=quality)
        self._c = compressor

    def chunk(self, data: bytes) -> bytes:
        c = self._c
        return c.process(data) + c.flush()

    def finish(self) -> bytes:
        return self._c.finish()


def encoder(coding: str, config: CompressConfig) -> Encoder:
    if coding == "br":
        return _Brotli(config.br_quality)
    return _Gzip(config.gzip_level)


@final
class _CompressingSink:
    """Sits between the upstream's body and the client: each chunk compressed and flushed."""

    __slots__ = ("_encoder", "_sink")

    def __init__(self, sink: BodySink, encoder: Encoder) -> None:
        self._sink = sink
        self._encoder = encoder

    def write(self, data: bytes) -> None:
        out = self._encoder.chunk(data)
        if out:
            # never an empty write: on a chunked response it would read as the last chunk
            self._sink.write(out)


@final
class CompressedStream:
    """A `BodyStream` of the compressed form of another: framing chunked (length unknown), flow
    control and endings passed to the stream it wraps."""

    __slots__ = ("_encoder", "_inner", "length")

    def __init__(self, inner: BodyStream, encoder: Encoder) -> None:
        self._inner = inner
        self._encoder = encoder
        self.length: int | None = None

    async def pipe(self, sink: BodySink) -> None:
        await self._inner.pipe(_CompressingSink(sink, self._encoder))
        tail = self._encoder.finish()
        if tail:
            sink.write(tail)

    def pause(self) -> None:
        self._inner.pause()

    def resume(self) -> None:
        self._inner.resume()

    def progressing(self) -> None:
        self._inner.progressing()

    def abort(self) -> None:
        self._inner.abort()

    def release_unused(self) -> None:
        self._inner.release_unused()


# -- the stage ------------------------------------------------------------------------------------

#: outcomes (gateway_stage_total{stage="compress"}): compressed with br or gzip; the response
#: could not be (type, size, status, encoded, no-transform, a HEAD or Range request); the
#: response could have been but the client accepted no offered coding
BR: Final = "br"
GZIP: Final = "gzip"
SKIPPED: Final = "skipped"
NOT_ACCEPTED: Final = "not_accepted"

#: statuses whose body is never compressed: none (204, 304), a part (206)
_NO_COMPRESS: Final = frozenset({204, 206, 304})
#: Accept-Encoding values remembered with their choice (browsers send a handful)
_CHOICE_CACHE: Final = 256


def _media_type(value: bytes) -> bytes:
    return value.split(b";", 1)[0].strip().lower()


def _has_token(value: bytes, token: bytes) -> bool:
    return any(item.strip().lower().split(b"=", 1)[0] == token for item in value.split(b","))


def _weak(etag: bytes) -> bytes:
    value = etag.strip()
    if value.startswith(b'"'):
        return b"W/" + value
    return etag


@final
class CompressStage:
    __slots__ = (
        "_choices",
        "_config",
        "_exact",
        "_min_bytes",
        "_offered",
        "_outcomes",
        "_prefixes",
    )

    def __init__(self, config: CompressConfig, total: Counter) -> None:
        self._config = config
        self._offered = config.encodings
        self._min_bytes = config.min_bytes
        self._exact = frozenset(t.encode("ascii") for t in config.types if not t.endswith("/*"))
        #: b"text/" for text/*
        self._prefixes = tuple(t[:-1].encode("ascii") for t in config.types if t.endswith("/*"))
        self._choices: dict[bytes, str | None] = {}
        self._outcomes = StageOutcomes(total, "compress")

    def _count(self, ctx: RequestContext, outcome: str) -> None:
        self._outcomes.count(ctx.route.name, outcome)
        ctx.outcome("compress", outcome)

    def _choose(self, accept: bytes | None) -> str | None:
        if accept is None:
            return None
        choices = self._choices
        if accept in choices:
            return choices[accept]
        coding = choose_coding(accept, self._offered)
        if len(choices) >= _CHOICE_CACHE:
            choices.clear()  # odd values from scanners: start over rather than grow
        choices[accept] = coding
        return coding

    def _type_matches(self, content_type: bytes) -> bool:
        media = _media_type(content_type)
        if media in self._exact:
            return True
        return any(media.startswith(p) for p in self._prefixes)

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Response:
        head = ctx.head
        accept: bytes | None = None
        ranged = False
        for name, value in head.headers:
            size = len(name)
            if size == 15 and name.lower() == b"accept-encoding":
                accept = value if accept is None else accept + b"," + value
            elif size == 5 and name.lower() == b"range":
                ranged = True
        response = await call_next(ctx)
        if head.method == "HEAD" or ranged:
            self._count(ctx, SKIPPED)
            return response
        status = response.status
        if status < 200 or status in _NO_COMPRESS or response.tunnel is not None:
            self._count(ctx, SKIPPED)
            return response
        headers = response.headers
        content_type: bytes | None = None
        for name, value in headers:
            size = len(name)
            if size == 12 and name.lower() == b"content-type":
                content_type = value
            elif size == 16 and name.lower() == b"content-encoding":
                self._count(ctx, SKIPPED)  # already encoded (identity included: leave it)
                return response
            elif (
                size == 13
                and name.lower() == b"cache-control"
                and _has_token(value, b"no-transform")
            ):
                self._count(ctx, SKIPPED)
                return response
        if content_type is None or not self._type_matches(content_type):
            self._count(ctx, SKIPPED)
            return response
        stream = response.stream
        if stream is None:
            known: int | None = len(response.body)
        else:
            known = stream.length
        if known is not None and known < self._min_bytes:
            self._count(ctx, SKIPPED)
            return response
        coding = self._choose(accept)
        response.headers = _edited(headers, coding)
        if coding is None:
            self._count(ctx, NOT_ACCEPTED)
            return response
        enc = encoder(coding, self._config)
        if stream is None:
            response.body = enc.chunk(response.body) + enc.finish()
        else:
            response.stream = CompressedStream(stream, enc)
        self._count(ctx, coding)
        return response


def _edited(headers: list[tuple[bytes, bytes]], coding: str | None) -> list[tuple[bytes, bytes]]:
    """The response's headers for a compressible response: Accept-Encoding in Vary, and when
    `coding` is chosen, Content-Encoding set, the ETag weakened and Accept-Ranges dropped."""
    result: list[tuple[bytes, bytes]] = []
    varied = False
    for name, value in headers:
        low = name.lower()
        if low == b"vary":
            if not varied:
                varied = True
                items = [i.strip().lower() for i in value.split(b",")]
                if b"accept-encoding" not in items and b"*" not in items:
                    stripped = value.strip(b" \t")
                    value = stripped + b", Accept-Encoding" if stripped else b"Accept-Encoding"
        elif coding is not None:
            if low == b"etag":
                value = _weak(value)
            elif low == b"accept-ranges":
                continue
        result.append((name, value))
    if not varied:
        result.append((b"Vary", b"Accept-Encoding"))
    if coding is not None:
        result.append((b"Content-Encoding", coding.encode("ascii")))
    return result


def build(config: CompressConfig, spec: StageSpec, env: BuildContext) -> CompressStage:
    return CompressStage(config, env.metrics.stage_total)


def _parse(r: Reader, raw: object, path: str) -> CompressConfig | None:
    return _FIELDS.parse(r, raw, path)


KIND: Final[StageKind[CompressConfig, CompressStage]] = StageKind(
    name="compress",
    parse=_parse,
    build=build,
    example=EXAMPLE,
    check=_check,
    describe=_describe,
)
