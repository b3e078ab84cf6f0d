"""Span records as an OTLP `ExportTraceServiceRequest`, written directly in protobuf's wire
format (https://protobuf.dev/programming-guides/encoding/) — the body of an OTLP/HTTP export
and of the OTLP/gRPC `Export` call.

Why our own: building opentelemetry-proto's messages field by field from Python costs ~36 µs
per span, and the SDK's encoder ~49 µs; this module, compiled with the hot path, writes the
same bytes in a few µs, on the event loop as each span ends (see gateway.observability.spans
for why there and not on the export thread).  Only
the handful of messages a span needs are written (field numbers from
opentelemetry/proto/{collector/trace,trace,common,resource}/v1/*.proto); the tests decode every
byte with opentelemetry-proto, so a wrong number cannot go unnoticed.
"""

from __future__ import annotations

import struct
from binascii import unhexlify
from collections.abc import Sequence
from typing import Final, cast, final

from gateway.observability.spans import Attributes, AttributeValue, SpanRecord

# wire types
_VARINT: Final = 0
_FIXED64: Final = 1
_LENGTH: Final = 2
_FIXED32: Final = 5

# Span.flags (field 16): the W3C trace flags in bits 0-7, then whether the parent is remote
_SAMPLED_FLAG: Final = 0x01
_HAS_IS_REMOTE: Final = 0x100
_IS_REMOTE: Final = 0x200
_STATUS_ERROR: Final = 2
#: (a constant beyond 63 bits is a boxed integer in compiled code: only negatives touch it)
_UINT64: Final = 0xFFFF_FFFF_FFFF_FFFF


#: each one-byte varint as bytes, ready to append
_ONE_BYTE: Final = [bytes((n,)) for n in range(0x80)]

# A message is written as a list of byte strings joined once: appending to a list is cheap in
# compiled code, while growing a bytearray piece by piece reallocates it (~250 instructions a
# piece, most of the encoder's time when it did).
Parts = list[bytes]


def _put_varint(out: Parts, value: int) -> None:
    if 0 <= value < 0x80:  # tags and most lengths: one byte
        out.append(_ONE_BYTE[value])
        return
    if 0 < value < 0x4000:  # a span's length: two bytes, without the general loop
        out.append(bytes((value & 0x7F | 0x80, value >> 7)))
        return
    if value < 0:
        value &= _UINT64  # int64: a negative value is its two's complement
    encoded = bytearray()
    while value > 0x7F:
        encoded.append((value & 0x7F) | 0x80)
        value >>= 7
    encoded.append(value)
    out.append(bytes(encoded))


def _varint_size(value: int) -> int:
    if 0 <= value < 0x80:
        return 1
    size = 1
    if value < 0:
        value &= _UINT64
    while value > 0x7F:
        size += 1
        value >>= 7
    return size


def _put_tag(out: Parts, field: int, wire_type: int) -> None:
    _put_varint(out, (field << 3) | wire_type)


def _put_field(out: Parts, field: int, payload: bytes) -> None:
    """A length-delimited field: bytes, a string, or an embedded message."""
    _put_tag(out, field, _LENGTH)
    _put_varint(out, len(payload))
    out.append(payload)


def _put_fixed64(out: Parts, field: int, value: int) -> None:
    _put_tag(out, field, _FIXED64)
    out.append(value.to_bytes(8, "little"))


#: KeyValue's `key` field, ready to write, for each attribute name seen (names are the code's
#: and the config's own: a few dozen)
_KEYS: Final[dict[str, bytes]] = {}
_MAX_KEYS: Final = 1024


def _key(name: str) -> bytes:
    encoded = _KEYS.get(name)
    if encoded is None:
        out: Parts = []
        _put_field(out, 1, name.encode())
        encoded = b"".join(out)
        if len(_KEYS) < _MAX_KEYS:
            _KEYS[name] = encoded
    return encoded


def _put_attribute(out: Parts, field: int, name: str, value: AttributeValue) -> None:
    """KeyValue { key = 1, value = 2: AnyValue { string_value = 1, bool_value = 2,
    int_value = 3, double_value = 4 } } as `field` of the enclosing message.  Lengths are
    computed first so that every byte is written once, into `out`."""
    key = _key(name)
    if isinstance(value, str):
        text = value.encode()
        any_size = 1 + _varint_size(len(text)) + len(text)
    elif isinstance(value, int):  # a bool too
        text = b""
        any_size = 1 + _varint_size(int(value))
    else:
        text = struct.pack("<d", value)
        any_size = 1 + 8
    _put_tag(out, field, _LENGTH)
    _put_varint(out, len(key) + 1 + _varint_size(any_size) + any_size)
    out.append(key)
    _put_tag(out, 2, _LENGTH)
    _put_varint(out, any_size)
    if isinstance(value, str):
        _put_tag(out, 1, _LENGTH)
        _put_varint(out, len(text))
        out.append(text)
    elif isinstance(value, bool):
        _put_tag(out, 2, _VARINT)
        out.append(_ONE_BYTE[1 if value else 0])
    elif isinstance(value, int):
        _put_tag(out, 3, _VARINT)
        _put_varint(out, value)
    else:
        _put_tag(out, 4, _FIXED64)
        out.append(text)


@final
class _Remembered:
    """Each attribute written before, as the bytes `_put_attribute` wrote for it, by field,
    name and value: a span's attributes mostly repeat from one request to the next (method,
    route, addresses, status), and three dict lookups by keys whose hashes are cached cost a
    fraction of writing one (a single lookup by a (field, name, value) tuple cost ~570
    instructions, hashing and comparing the tuple).  Strings and ints only: as dict keys True
    == 1 == 1.0, and a bool or a double attribute is rare.  Emptied when `count` reaches the
    bound, so values that do not repeat (a path each request) cost memory only up to it.
    Spans are encoded on the event loop and so are an exporter's resource attributes; should
    another thread ever encode too, each entry holds the right bytes whoever wrote it, and a
    lookup or store is one dict operation under the GIL."""

    __slots__ = ("by_field", "count")

    def __init__(self) -> None:
        self.by_field: dict[int, dict[str, dict[str | int, bytes]]] = {}
        self.count = 0


_REMEMBERED: Final = _Remembered()
_MAX_REMEMBERED: Final = 4096


def _put_attributes(out: Parts, field: int, attributes: Attributes) -> None:
    """Each attribute of a flat list (spans.Attributes: a name, then its value)."""
    memory = _REMEMBERED
    by_name = memory.by_field.get(field)
    if by_name is None:
        by_name = memory.by_field[field] = {}
    for at in range(0, len(attributes), 2):
        name = cast(str, attributes[at])  # compiled: a type check, not a call
        value = attributes[at + 1]
        kind = type(value)
        if kind is not str and kind is not int:
            _put_attribute(out, field, name, value)
            continue
        key: str | int = value  # type: ignore[assignment]  # a str or an int, checked above
        by_value = by_name.get(name)
        if by_value is None:
            by_value = by_name[name] = {}
        encoded = by_value.get(key)
        if encoded is None:
            one: Parts = []
            _put_attribute(one, field, name, value)
            encoded = b"".join(one)
            if memory.count >= _MAX_REMEMBERED:
                memory.by_field.clear()
                memory.count = 0
                by_name = memory.by_field[field] = {}
                by_value = by_name[name] = {}
            by_value[key] = encoded
            memory.count += 1
        out.append(encoded)


def resource_and_scope(
    resource: Sequence[tuple[str, AttributeValue]], scope_name: str, scope_version: str
) -> tuple[bytes, bytes]:
    """The Resource (attributes = 1) and InstrumentationScope (name = 1, version = 2) every
    export repeats: encoded once per exporter."""
    scope: Parts = []
    _put_field(scope, 1, scope_name.encode())
    if scope_version:
        _put_field(scope, 2, scope_version.encode())
    attributes: Parts = []
    _put_attributes(attributes, 1, [item for pair in resource for item in pair])
    return b"".join(attributes), b"".join(scope)


# Span's fields of a fixed size, their tag and length as one constant: trace_id = 1 (16 bytes),
# span_id = 2 and parent_span_id = 4 (8 bytes), kind = 6 (a varint: SpanKind is under 128),
# start/end_time_unix_nano = 7/8 (fixed64), flags = 16 (fixed32, a two-byte tag)
_TRACE_ID_FIELD: Final = bytes((1 << 3 | _LENGTH, 16))
_SPAN_ID_FIELD: Final = bytes((2 << 3 | _LENGTH, 8))
_PARENT_SPAN_ID_FIELD: Final = bytes((4 << 3 | _LENGTH, 8))
_KIND_TAG: Final = bytes((6 << 3 | _VARINT,))
_START_TAG: Final = 7 << 3 | _FIXED64
_END_TAG: Final = 8 << 3 | _FIXED64
_FLAGS_TAG: Final = bytes(((16 << 3 | _FIXED32) & 0x7F | 0x80, (16 << 3 | _FIXED32) >> 7))
#: the flags field whole, for the two values a recorded span can have (sampled; whether the
#: parent is known to be remote or not)
_LOCAL_PARENT_FLAGS: Final = _FLAGS_TAG + (_SAMPLED_FLAG | _HAS_IS_REMOTE).to_bytes(4, "little")
_REMOTE_PARENT_FLAGS: Final = _FLAGS_TAG + (_SAMPLED_FLAG | _HAS_IS_REMOTE | _IS_REMOTE).to_bytes(
    4, "little"
)
#: start_time_unix_nano = 7 and end_time_unix_nano = 8, tags and values, in one pack
_TIMES: Final = struct.Struct("<BQBQ")


def _put_span(out: Parts, span: SpanRecord) -> None:
    """One Span message's fields."""
    out.append(_TRACE_ID_FIELD)
    out.append(unhexlify(span.trace_id))
    out.append(_SPAN_ID_FIELD)
    out.append(unhexlify(span.span_id))
    if span.trace_state:
        _put_field(out, 3, span.trace_state.encode())
    flags = _LOCAL_PARENT_FLAGS
    if span.parent_span_id:
        out.append(_PARENT_SPAN_ID_FIELD)
        out.append(unhexlify(span.parent_span_id))
        if span.parent_is_remote:
            flags = _REMOTE_PARENT_FLAGS
    _put_field(out, 5, span.name.encode())
    out.append(_KIND_TAG)
    out.append(_ONE_BYTE[span.kind])
    out.append(_TIMES.pack(_START_TAG, span.start_ns, _END_TAG, span.end_ns))
    _put_attributes(out, 9, span.attributes)
    for name, time_ns, attributes in span.events:
        # Event: time_unix_nano = 1, name = 2, attributes = 3
        event: Parts = []
        _put_fixed64(event, 1, time_ns)
        _put_field(event, 2, name.encode())
        _put_attributes(event, 3, attributes)
        _put_field(out, 11, b"".join(event))
    if span.error:
        _put_field(out, 15, bytes((3 << 3 | _VARINT, _STATUS_ERROR)))  # Status.code = 3
    out.append(flags)


def encode_span(record: SpanRecord) -> bytes:
    """One span as a ScopeSpans `spans` field (= 2): a piece of an export request (see
    `export_request`), written on the event loop when the span ends."""
    span: Parts = []
    _put_span(span, record)
    out: Parts = []
    _put_field(out, 2, b"".join(span))
    return b"".join(out)


def export_request(resource: bytes, scope: bytes, encoded_spans: Sequence[bytes]) -> bytes:
    """ExportTraceServiceRequest { resource_spans = 1: ResourceSpans { resource = 1,
    scope_spans = 2: ScopeSpans { scope = 1, spans = 2 } } } holding the spans `encode_span`
    wrote (repeated fields may simply follow each other)."""
    scope_spans: Parts = []
    _put_field(scope_spans, 1, scope)
    scope_spans.extend(encoded_spans)
    resource_spans: Parts = []
    _put_field(resource_spans, 1, resource)
    _put_field(resource_spans, 2, b"".join(scope_spans))
    request: Parts = []
    _put_field(request, 1, b"".join(resource_spans))
    return b"".join(request)
