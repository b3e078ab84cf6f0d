"""Span records as an OTLP `ExportTraceServiceRequest`, written directly in protobuf's wire
format (https://protobuf.dev/programming-guides/encoding/) — the body of an OTLP/HTTP export
and of the OTLP/gRPC `Export` call.

Why our own: building opentelemetry-proto's messages field by field from Python costs ~36 µs
per span, and the SDK's encoder ~49 µs; this module, compiled with the hot path, writes the
same bytes in a few µs (~13k instructions a span), on the event loop as each span ends (see
gateway.observability.spans for why there and not on the export thread).  Only the handful
of messages a span needs are written (field numbers from
opentelemetry/proto/{collector/trace,trace,common,resource}/v1/*.proto); the tests decode
every byte with opentelemetry-proto, so a wrong number cannot go unnoticed.
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

# A span is written in few pieces: its fixed fields formatted together (`b"%b%b" % (...)`
# compiles to one allocation and a copy of each piece), its attributes as a list of byte
# strings joined once.  Every piece is an object made, listed and freed (~100 instructions,
# callgrind), so a tag or a length is never a piece of its own on a span's path — writing them
# so cost a third of the encoder's instructions — and a bytearray grown piece by piece
# reallocates (~250 instructions a piece).  The messages written once per exporter (resource,
# scope, the request around a batch) still use the simpler `_put_*` helpers.
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


def _put_tag(out: Parts, field: int, wire_type: int) -> None:
    _put_varint(out, (field << 3) | wire_type)


def _put_field(out: Parts, field: int, payload: bytes) -> None:
    """A length-delimited field: bytes, a string, or an embedded message."""
    _put_tag(out, field, _LENGTH)
    _put_varint(out, len(payload))
    out.append(payload)


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
# AnyValue's fields: string_value = 1, bool_value = 2, int_value = 3, double_value = 4; and
# KeyValue.value = 2
_STRING_VALUE_TAG: Final = bytes((1 << 3 | _LENGTH,))
_TRUE_VALUE: Final = bytes((2 << 3 | _VARINT, 1))
_FALSE_VALUE: Final = bytes((2 << 3 | _VARINT, 0))
_INT_VALUE_TAG: Final = bytes((3 << 3 | _VARINT,))
_DOUBLE_VALUE_TAG: Final = bytes((4 << 3 | _FIXED64,))
_ANY_VALUE_TAG: Final = bytes((2 << 3 | _LENGTH,))
# the one-byte tags of the other length-delimited fields a span writes: Span.trace_state = 3,
# name = 5, events = 11, status = 15; Event.name = 2; ScopeSpans.spans = 2
_TRACE_STATE_TAG: Final = bytes((3 << 3 | _LENGTH,))
_NAME_TAG: Final = bytes((5 << 3 | _LENGTH,))
_EVENTS_TAG: Final = bytes((11 << 3 | _LENGTH,))
_EVENT_NAME_TAG: Final = bytes((2 << 3 | _LENGTH,))
_SPANS_TAG: Final = bytes((2 << 3 | _LENGTH,))
#: Event.time_unix_nano = 1, tag and value
_EVENT_TIME_TAG: Final = 1 << 3 | _FIXED64
_EVENT_TIME: Final = struct.Struct("<BQ")
#: Span.status (= 15) whole for an error: Status { code = 3: STATUS_CODE_ERROR }
_ERROR_STATUS: Final = bytes((15 << 3 | _LENGTH, 2, 3 << 3 | _VARINT, _STATUS_ERROR))


def _length(size: int) -> bytes:
    """A length as its varint bytes: one or two for every field of a span but a huge value."""
    if size < 0x80:
        return _ONE_BYTE[size]
    if size < 0x4000:
        return bytes((size & 0x7F | 0x80, size >> 7))
    out: Parts = []
    _put_varint(out, size)
    return out[0]


def _field(field_tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field whose tag (`field_tag`, bytes ready to write) is one byte."""
    return b"%b%b%b" % (field_tag, _length(len(payload)), payload)


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


def _attribute(field: int, name: str, value: AttributeValue) -> bytes:
    """KeyValue { key = 1, value = 2: AnyValue { string_value = 1, bool_value = 2,
    int_value = 3, double_value = 4 } } as `field` of the enclosing message (a field number
    under 16: a one-byte tag)."""
    if isinstance(value, str):
        text = value.encode()
        any_value = b"%b%b%b" % (_STRING_VALUE_TAG, _length(len(text)), text)
    elif isinstance(value, bool):
        any_value = _TRUE_VALUE if value else _FALSE_VALUE
    elif isinstance(value, int):
        number: Parts = [_INT_VALUE_TAG]
        _put_varint(number, value)
        any_value = b"".join(number)
    else:
        any_value = _DOUBLE_VALUE_TAG + struct.pack("<d", value)
    key_value = b"%b%b%b%b" % (_key(name), _ANY_VALUE_TAG, _length(len(any_value)), any_value)
    return _field(_ONE_BYTE[field << 3 | _LENGTH], key_value)


@final
class _Remembered:
    """Each attribute written before, as the bytes `_attribute` wrote for it, by field, name
    and value: a span's attributes mostly repeat from one request to the next (method, route,
    addresses, status), and two dict lookups by keys whose hashes are cached cost a fraction of
    writing one (a single lookup by a (field, name, value) tuple cost ~570 instructions,
    hashing and comparing the tuple).  Strings and ints only: as dict keys True == 1 == 1.0,
    and a bool or a double attribute is rare.

    Bounded without ever being emptied: a name stops being remembered at `_PER_NAME` values
    (a request id, a path with ids in it: values that do not repeat fill their own name's
    share, and are written directly from then on, while the names that do repeat keep
    theirs), and no new value is remembered once `count` reaches `_MAX_REMEMBERED`.
    Spans are encoded on the event loop and so are an exporter's resource attributes; should
    another thread ever encode too, each entry holds the right bytes whoever wrote it, and a
    lookup or store is one dict operation under the GIL."""

    __slots__ = ("by_field", "count")

    def __init__(self) -> None:
        self.by_field: dict[int, dict[str, dict[str | int, bytes]]] = {}
        self.count = 0


_REMEMBERED: Final = _Remembered()
_PER_NAME: Final = 256
_MAX_REMEMBERED: Final = 8192


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
            out.append(_attribute(field, name, value))
            continue
        key: str | int = value  # type: ignore[assignment]  # a str or an int, checked above
        by_value = by_name.get(name)
        if by_value is None:
            by_value = by_name[name] = {}
        encoded = by_value.get(key)
        if encoded is None:
            encoded = _attribute(field, name, value)
            if len(by_value) < _PER_NAME and memory.count < _MAX_REMEMBERED:
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


#: the name field (= 5) of each span name seen (a route's names repeat), bounded like _KEYS
_NAMES: Final[dict[str, bytes]] = {}


def _name_field(name: str) -> bytes:
    encoded = _NAMES.get(name)
    if encoded is None:
        encoded = _field(_NAME_TAG, name.encode())
        if len(_NAMES) < _MAX_KEYS:
            _NAMES[name] = encoded
    return encoded


def _attributes_bytes(field: int, attributes: Attributes) -> bytes:
    if not attributes:
        return b""
    out: Parts = []
    _put_attributes(out, field, attributes)
    return b"".join(out)


def _events_bytes(events: list[tuple[str, int, Attributes]]) -> bytes:
    """Each Event { time_unix_nano = 1, name = 2, attributes = 3 } as Span.events (= 11)."""
    encoded = b""
    for name, time_ns, attributes in events:
        event = b"%b%b%b" % (
            _EVENT_TIME.pack(_EVENT_TIME_TAG, time_ns),
            _field(_EVENT_NAME_TAG, name.encode()),
            _attributes_bytes(3, attributes),
        )
        encoded += _field(_EVENTS_TAG, event)
    return encoded


def _span_body(span: SpanRecord) -> bytes:
    """One Span message's fields, in a handful of pieces: each piece of a span is a bytes
    object made, kept in a list and joined, so writing a tag or a length as a piece of its own
    cost more than writing its bytes (~100 instructions a piece, callgrind) — here the fixed
    fields are formatted together and only the attributes are joined."""
    ids = b"%b%b%b%b" % (
        _TRACE_ID_FIELD,
        unhexlify(span.trace_id),
        _SPAN_ID_FIELD,
        unhexlify(span.span_id),
    )
    if span.trace_state:
        ids += _field(_TRACE_STATE_TAG, span.trace_state.encode())
    flags = _LOCAL_PARENT_FLAGS
    if span.parent_span_id:
        ids += _PARENT_SPAN_ID_FIELD + unhexlify(span.parent_span_id)
        if span.parent_is_remote:
            flags = _REMOTE_PARENT_FLAGS
    events = _events_bytes(span.events) if span.events else b""
    return b"%b%b%b%b%b%b%b%b%b" % (
        ids,
        _name_field(span.name),
        _KIND_TAG,
        _ONE_BYTE[span.kind],
        _TIMES.pack(_START_TAG, span.start_ns, _END_TAG, span.end_ns),
        _attributes_bytes(9, span.attributes),
        events,
        _ERROR_STATUS if span.error else b"",
        flags,
    )


def encode_span(record: SpanRecord) -> bytes:
    """One span as a ScopeSpans `spans` field (= 2): a piece of an export request (see
    `export_request`), written on the event loop when the span ends."""
    return _field(_SPANS_TAG, _span_body(record))


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
