"""The OTLP bytes the gateway writes itself, decoded with opentelemetry-proto's own messages:
every field a span carries, every attribute value type, and the framing of a batch."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from gateway.observability.otlp_encoding import encode_span, export_request, resource_and_scope
from gateway.observability.spans import CLIENT, SERVER, AttributeValue, SpanRecord

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
PARENT = "b7ad6b7169203331"


def decode(data: bytes) -> ExportTraceServiceRequest:
    message = ExportTraceServiceRequest()
    message.ParseFromString(data)
    return message


def value_of(value: AnyValue) -> object:
    which = value.WhichOneof("value")
    return None if which is None else getattr(value, which)


def span(**changes: object) -> SpanRecord:
    record = SpanRecord(TRACE, SPAN, PARENT, True, "k=v,a=b", SERVER, "GET /api/*", [])
    for name, value in changes.items():
        setattr(record, name, value)
    return record


def forget_attributes() -> None:
    """Empty the encoder's memory of attributes (module state, shared by every test)."""
    from gateway.observability import otlp_encoding

    otlp_encoding._REMEMBERED.by_field.clear()
    otlp_encoding._REMEMBERED.count = 0


def encode_export_request(resource: bytes, scope: bytes, spans: list[SpanRecord]) -> bytes:
    """A request holding `spans`, written in one piece."""
    return export_request(resource, scope, [encode_span(span) for span in spans])


def only_span(*records: SpanRecord, resource: bytes = b"", scope: bytes = b"") -> Span:
    [resource_spans] = decode(encode_export_request(resource, scope, list(records))).resource_spans
    [scope_spans] = resource_spans.scope_spans
    [decoded] = scope_spans.spans
    return decoded


def test_a_server_span_with_a_remote_parent_round_trips() -> None:
    record = span()
    record.add_event("gateway.retry", ["gateway.decision", "retried:1"])
    record.end(503, "503", ["client.address", "10.0.0.1"])
    decoded = only_span(record)
    assert decoded.trace_id.hex() == TRACE
    assert decoded.span_id.hex() == SPAN
    assert decoded.parent_span_id.hex() == PARENT
    assert decoded.trace_state == "k=v,a=b"
    assert decoded.name == "GET /api/*"
    assert decoded.kind == Span.SPAN_KIND_SERVER
    assert (decoded.start_time_unix_nano, decoded.end_time_unix_nano) == (
        record.start_ns,
        record.end_ns,
    )
    assert {kv.key: value_of(kv.value) for kv in decoded.attributes} == {
        "http.response.status_code": 503,
        "client.address": "10.0.0.1",
        "error.type": "503",
    }
    [event] = decoded.events
    assert (event.name, event.time_unix_nano) == ("gateway.retry", record.events[0][1])
    assert [(kv.key, value_of(kv.value)) for kv in event.attributes] == [
        ("gateway.decision", "retried:1")
    ]
    assert decoded.status.code == Status.STATUS_CODE_ERROR
    # sampled, and the parent's remoteness is known: it is remote
    assert decoded.flags == 0x01 | 0x100 | 0x200


def test_a_root_client_span_has_no_parent_no_state_and_an_unset_status() -> None:
    record = span(parent_span_id="", parent_is_remote=False, trace_state="", kind=CLIENT)
    record.end(200, None)
    decoded = only_span(record)
    assert decoded.parent_span_id == b""
    assert decoded.trace_state == ""
    assert decoded.kind == Span.SPAN_KIND_CLIENT
    assert decoded.status.code == Status.STATUS_CODE_UNSET
    assert decoded.flags == 0x01 | 0x100


@pytest.mark.parametrize("size", [0, 127, 128, 16383, 16384, 70_000])
def test_lengths_of_one_two_and_more_varint_bytes_round_trip(size: int) -> None:
    """A length under 128 is one varint byte, under 16384 two (a shortcut of its own), more
    takes the general loop: each is read back whole."""
    text = "x" * size
    record = span(attributes=["k", text])
    decoded = only_span(record)
    [attribute] = decoded.attributes
    assert value_of(attribute.value) == text
    assert decoded.name == "GET /api/*"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "é — ünïcode",
        "x" * 300,  # a length over 127: a two-byte varint
        True,
        False,
        0,
        1,
        127,
        128,
        2**63 - 1,
        -1,
        -(2**63),
        0.0,
        -2.5,
        1e300,
    ],
    ids=repr,
)
def test_every_attribute_value_type_round_trips(value: AttributeValue) -> None:
    record = span(attributes=["k", value])
    [attribute] = only_span(record).attributes
    decoded = value_of(attribute.value)
    assert decoded == value
    assert type(decoded) is type(value)


def test_a_batch_carries_its_resource_and_scope_once_and_every_span_in_order() -> None:
    resource, scope = resource_and_scope(
        [("service.name", "edge"), ("deployment.environment.name", "prod")], "gateway", "1.2.3"
    )
    records = [span(span_id=f"{i + 1:016x}", name=f"span {i}") for i in range(300)]
    message = decode(encode_export_request(resource, scope, records))
    [resource_spans] = message.resource_spans
    assert {kv.key: value_of(kv.value) for kv in resource_spans.resource.attributes} == {
        "service.name": "edge",
        "deployment.environment.name": "prod",
    }
    [scope_spans] = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("gateway", "1.2.3")
    assert [s.name for s in scope_spans.spans] == [f"span {i}" for i in range(300)]
    assert [s.span_id.hex() for s in scope_spans.spans] == [r.span_id for r in records]


def test_a_batch_written_a_few_spans_at_a_time_is_the_same_request() -> None:
    """Spans are encoded one by one as they end, and an export joins whatever pieces it holds:
    pieces of any grouping are byte for byte the request written in one go."""
    resource, scope = resource_and_scope([("service.name", "edge")], "gateway", "")
    records = [span(span_id=f"{i + 1:016x}") for i in range(100)]
    pieces = [b"".join(map(encode_span, records[i : i + 32])) for i in range(0, 100, 32)]
    assert len(pieces) == 4
    whole = encode_export_request(resource, scope, records)
    assert export_request(resource, scope, pieces) == whole
    [resource_spans] = decode(whole).resource_spans
    assert len(resource_spans.scope_spans[0].spans) == 100


def test_a_remembered_attribute_keeps_its_type_bool_int_and_double_of_one_value() -> None:
    """Encoded attributes are remembered by value: True, 1 and 1.0 are equal as dict keys, so
    each must still come back as its own type, in any order, and again from memory."""
    for _ in range(2):
        for value in (True, 1, 1.0, False, 0, 0.0):
            record = span(attributes=["x", value])
            [attribute] = only_span(record).attributes
            decoded = value_of(attribute.value)
            assert type(decoded) is type(value), (value, decoded)
            assert decoded == value


def test_remembered_attributes_are_bounded_by_name_and_in_all_and_still_right() -> None:
    """A name whose values never repeat (a request id) stops being remembered at its share and
    is written directly from then on, while a name that repeats is still remembered after it;
    however many names there are, the memory stays under its bound."""
    from gateway.observability import otlp_encoding

    memory = otlp_encoding._REMEMBERED
    forget_attributes()

    def remembered(name: str) -> dict[str | int, bytes]:
        return memory.by_field.get(9, {}).get(name, {})

    per_name = otlp_encoding._PER_NAME
    for n in range(per_name + 10):
        [attribute] = only_span(span(attributes=["gateway.request_id", f"id-{n}"])).attributes
        assert value_of(attribute.value) == f"id-{n}"
    assert len(remembered("gateway.request_id")) == per_name
    assert "id-0" in remembered("gateway.request_id")
    assert f"id-{per_name + 9}" not in remembered("gateway.request_id")
    # a repeating value of another name is remembered (and read back right) after that
    for _ in range(2):
        [attribute] = only_span(span(attributes=["http.route", "/api/*"])).attributes
        assert value_of(attribute.value) == "/api/*"
    assert "/api/*" in remembered("http.route")

    bound = otlp_encoding._MAX_REMEMBERED
    names = bound // per_name + 2  # more names filling their share than the bound holds
    for name in range(names):
        for n in range(per_name):
            record = span(attributes=[f"name.{name}", n])
            [attribute] = only_span(record).attributes
            assert (attribute.key, value_of(attribute.value)) == (f"name.{name}", n)
    assert memory.count <= bound
    assert sum(len(v) for by_name in memory.by_field.values() for v in by_name.values()) <= bound
    forget_attributes()  # the other tests' spans are remembered again


def test_an_attribute_remembered_as_a_spans_is_not_reused_as_an_events() -> None:
    """The same name and value as a span's attribute and as an event's are not the same bytes
    (field 9 vs 3): remembered apart."""
    forget_attributes()
    for _ in range(2):  # written, then from memory
        record = span(attributes=["k", "v"])
        record.add_event("e", ["k", "v"])
        decoded = only_span(record)
        assert [a.key for a in decoded.attributes] == ["k"]
        assert [a.key for a in decoded.events[0].attributes] == ["k"]
