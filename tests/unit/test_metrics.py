"""gateway.observability.instruments, exposition and metrics: children, text rendering (Prometheus
text and OpenMetrics, exemplars), multi-worker merge, snapshot files, the declarations."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway.observability.exposition import Registry, read_snapshots, wants_openmetrics
from gateway.observability.instruments import DEFAULT_BUCKETS, bounded_method
from gateway.observability.metrics import GatewayMetrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """(family name -> type, (sample name, sorted labels) -> value) via prometheus_client."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return types, samples


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, tuple(sorted(labels.items())))


def roundtrip(snapshot: dict[str, Any]) -> dict[str, Any]:
    """What another worker's snapshot looks like after its trip through a file."""
    data: dict[str, Any] = json.loads(json.dumps(snapshot))
    return data


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("GET", "GET"),
        ("PATCH", "PATCH"),
        ("CONNECT", "CONNECT"),
        ("get", "OTHER"),
        ("PURGE", "OTHER"),
    ],
)
def test_bounded_method_keeps_standard_methods_only(method: str, expected: str) -> None:
    assert bounded_method(method) == expected


def test_render_round_trips_through_the_prometheus_parser() -> None:
    r = Registry()
    requests = r.counter("app_requests_total", "Requests.", ("route", "code"))
    in_flight = r.gauge("app_in_flight", "In flight.")
    latency = r.histogram("app_latency_seconds", "Latency.", ("route",), buckets=(0.1, 1.0))
    requests.labels("users", "200").inc()
    requests.labels("users", "200").inc(2)
    requests.labels("orders", "503").inc()
    in_flight.inc(3)
    in_flight.dec()
    latency.labels("users").observe(0.05)
    latency.labels("users").observe(0.5)

    types, samples = parse(r.render())

    assert types == {
        "app_requests": "counter",
        "app_in_flight": "gauge",
        "app_latency_seconds": "histogram",
    }
    assert samples[key("app_requests_total", route="users", code="200")] == 3
    assert samples[key("app_requests_total", route="orders", code="503")] == 1
    assert samples[key("app_in_flight")] == 2
    assert samples[key("app_latency_seconds_bucket", route="users", le="0.1")] == 1
    assert samples[key("app_latency_seconds_bucket", route="users", le="1.0")] == 2
    assert samples[key("app_latency_seconds_bucket", route="users", le="+Inf")] == 2
    assert samples[key("app_latency_seconds_count", route="users")] == 2
    assert samples[key("app_latency_seconds_sum", route="users")] == pytest.approx(0.55)


def test_text_has_help_and_type_lines_and_total_suffix() -> None:
    r = Registry()
    r.counter("app_hits", "Hits.").inc()
    text = r.render()
    assert text.splitlines() == [
        "# HELP app_hits_total Hits.",
        "# TYPE app_hits_total counter",
        "app_hits_total 1",
    ]
    assert text.endswith("\n")


def test_label_values_and_help_are_escaped() -> None:
    r = Registry()
    tricky = 'a "quoted" back\\slash\nnew line'
    r.counter("app_total", 'Help with \\ and\nnewline "quotes".', ("v",)).labels(tricky).inc()
    text = r.render()
    assert 'v="a \\"quoted\\" back\\\\slash\\nnew line"' in text
    assert '# HELP app_total Help with \\\\ and\\nnewline "quotes".' in text
    families = list(text_string_to_metric_families(text))
    assert families[0].samples[0].labels == {"v": tricky}
    assert families[0].documentation == 'Help with \\ and\nnewline "quotes".'


def test_histogram_counts_are_exact_however_runs_of_one_bucket_are_read() -> None:
    """observe keeps a run of values in one bucket as a machine integer, added to the list
    when the bucket changes or when the counts are read: whenever they are read (between
    observations, in the middle of a run, twice in a row), they are the plain tally."""
    r = Registry()
    child = r.histogram("run_seconds", "Runs.", buckets=(0.001, 0.01, 0.1)).labels()
    values = (0.0005, 0.005, 0.05, 0.5)  # one in each bucket, +Inf included
    tally = [0, 0, 0, 0]
    for step, run_length in enumerate((1, 7, 1, 1, 300, 2, 45, 1, 9, 1000, 3)):
        bucket = (step * 3 + run_length) % 4
        for i in range(run_length):
            child.observe(values[bucket])
            tally[bucket] += 1
            if i % 97 == 5:
                assert child.counts == tally  # read in the middle of a run
        assert child.counts == tally
        assert child.counts == tally  # a second read adds nothing again
    _, samples = parse(r.render())
    assert samples[key("run_seconds_bucket", le="+Inf")] == sum(tally)


def test_histogram_buckets_are_le_and_cumulative_only_in_the_text() -> None:
    r = Registry()
    h = r.histogram("app_seconds", "Latency.", buckets=(1.0, 0.1, 0.5))  # sorted on declaration
    child = h.labels()
    for value in (0.1, 0.1000001, 0.5, 2.0, 100.0, 0.0):
        child.observe(value)
    # per-bucket storage: 0.0 and 0.1 (equal to the bound) in le=0.1, 0.1000001 and 0.5 in
    # le=0.5, nothing in le=1, 2.0 and 100.0 in +Inf
    assert child.counts == [2, 2, 0, 2]
    _, samples = parse(r.render())
    assert [samples[key("app_seconds_bucket", le=le)] for le in ("0.1", "0.5", "1.0", "+Inf")] == [
        2,
        4,
        4,
        6,
    ]
    assert samples[key("app_seconds_count")] == 6
    assert samples[key("app_seconds_sum")] == pytest.approx(102.7000001)


def test_unlabelled_families_update_directly_and_render_zero_before_use() -> None:
    r = Registry()
    c = r.counter("c_total", "C.")
    g = r.gauge("g", "G.")
    h = r.histogram("h", "H.", buckets=(1.0,))
    _, before = parse(r.render())
    assert before[key("c_total")] == 0
    assert before[key("g")] == 0
    assert before[key("h_count")] == 0
    c.inc()
    c.inc(4)
    g.set(7)
    g.dec(2)
    g.inc()
    h.observe(0.5)
    assert c.labels() is c.labels()
    _, after = parse(r.render())
    assert after[key("c_total")] == 5
    assert after[key("g")] == 6
    assert after[key("h_bucket", le="1.0")] == 1
    assert after[key("h_sum")] == 0.5


def test_children_are_cached_and_label_count_is_checked() -> None:
    r = Registry()
    family = r.counter("x_total", "X.", ("a", "b"))
    assert family.labels("1", "2") is family.labels("1", "2")
    assert family.labels("1", "2") is not family.labels("1", "3")
    with pytest.raises(ValueError, match="takes labels"):
        family.labels("1")
    with pytest.raises(TypeError, match=r"use \.labels"):
        family.inc()


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        ("1bad", ()),
        ("has-dash", ()),
        ("ok", ("bad-label",)),
        ("ok", ("__reserved",)),
        ("ok", ("le",)),
    ],
)
def test_invalid_names_are_rejected_at_declaration(name: str, labels: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="invalid"):
        Registry().gauge(name, "x", labels)


def test_a_family_cannot_be_declared_twice() -> None:
    r = Registry()
    r.counter("dup_total", "x")
    with pytest.raises(ValueError, match="declared twice"):
        r.counter("dup", "x")  # the same family once _total is added


def test_special_values_render_as_prometheus_spells_them() -> None:
    r = Registry()
    g = r.gauge("g", "G.", ("k",))
    g.labels("inf").set(math.inf)
    g.labels("ninf").set(-math.inf)
    g.labels("nan").set(math.nan)
    g.labels("frac").set(0.25)
    g.labels("big").set(1e20)
    text = r.render()
    assert 'g{k="inf"} +Inf' in text
    assert 'g{k="ninf"} -Inf' in text
    assert 'g{k="nan"} NaN' in text
    _, samples = parse(text)
    assert samples[key("g", k="frac")] == 0.25
    assert samples[key("g", k="big")] == 1e20
    assert math.isnan(samples[key("g", k="nan")])


def test_removed_and_replaced_info_children_are_not_rendered() -> None:
    r = Registry()
    metrics = GatewayMetrics(r)
    metrics.config_info.set_info("aaa")
    metrics.config_info.set_info("bbb")
    metrics.connections_active.labels("main").inc()
    metrics.connections_active.remove("main")
    _, samples = parse(r.render())
    assert samples[key("gateway_config_info", version="bbb")] == 1
    assert key("gateway_config_info", version="aaa") not in samples
    assert key("gateway_connections_active", listener="main") not in samples


def test_gateway_metrics_declares_the_spec_names() -> None:
    r = Registry()
    GatewayMetrics(r)
    types, samples = parse(r.render())
    assert types == {
        "gateway_requests": "counter",
        "gateway_request_duration_seconds": "histogram",
        "gateway_request_bytes": "counter",
        "gateway_response_bytes": "counter",
        "gateway_requests_in_flight": "gauge",
        "gateway_connections_active": "gauge",
        "gateway_connections_refused": "counter",
        "gateway_slow_clients": "counter",
        "gateway_upstream_evictions": "counter",
        "gateway_upstream_attempts": "counter",
        "gateway_upstream_busy": "counter",
        "gateway_upstream_request_duration_seconds": "histogram",
        "gateway_upstream_responses": "counter",
        "gateway_upstream_connect_duration_seconds": "histogram",
        "gateway_upstream_connections": "counter",
        "gateway_upstream_tls_handshake_duration_seconds": "histogram",
        "gateway_upstream_endpoint_up": "gauge",
        "gateway_outlier_ejections": "counter",
        "gateway_circuit_breaker_state": "gauge",
        "gateway_circuit_breaker_transitions": "counter",
        "gateway_rate_limited": "counter",
        "gateway_rate_limit_store_errors": "counter",
        "gateway_store_up": "gauge",
        "gateway_store_operations": "counter",
        "gateway_store_operation_duration_seconds": "histogram",
        "gateway_retries": "counter",
        "gateway_stage": "counter",
        "gateway_jwt": "counter",
        "gateway_jwt_keys_skipped": "counter",
        "gateway_idempotency": "counter",
        "gateway_idempotency_evictions": "counter",
        "gateway_idempotency_records": "gauge",
        "gateway_idempotency_records_bytes": "gauge",
        "gateway_retry_budget_exhausted": "counter",
        "gateway_tls_certificate_not_after_seconds": "gauge",
        "gateway_tracing_spans_dropped": "counter",
        "gateway_tracing_spans_exported": "counter",
        "gateway_config_reloads": "counter",
        "gateway_config_last_reload_success": "gauge",
        "gateway_config_info": "gauge",
        "gateway_build_info": "gauge",
        "process_cpu_seconds": "counter",
        "process_resident_memory_bytes": "gauge",
        "process_open_fds": "gauge",
        "process_start_time_seconds": "gauge",
    }
    assert r.families["gateway_request_duration_seconds"].label_names == ("route",)
    assert r.families["gateway_requests_total"].label_names == ("route", "method", "code")
    assert r.families["gateway_stage_total"].label_names == ("route", "stage", "outcome")
    assert samples[key("gateway_config_last_reload_success")] == 1
    assert r.families["gateway_circuit_breaker_transitions_total"].label_names == (
        "route",
        "upstream",
        "to",
    )
    assert r.families["gateway_upstream_endpoint_up"].label_names == ("upstream", "endpoint")
    assert r.families["gateway_retries_total"].label_names == ("route", "upstream", "reason")
    assert r.families["gateway_upstream_responses_total"].label_names == ("upstream", "class")
    assert r.families["gateway_build_info"].label_names == ("version", "python", "compiled")


def test_default_buckets_suit_a_proxy() -> None:
    h = Registry().histogram("h", "H.")
    assert h.bounds == DEFAULT_BUCKETS
    assert h.bounds[0] == 0.0005
    assert h.bounds[-1] == 30.0


def _worker(
    requests: int,
    latencies: list[float],
    in_flight: int,
    reload_ok: bool,
    version: str,
    orders: int = 0,
) -> Registry:
    r = Registry()
    m = GatewayMetrics(r)
    child = m.requests_total.labels("users", "GET", "200")
    for _ in range(requests):
        child.inc()
    if orders:
        m.requests_total.labels("orders", "POST", "201").inc(orders)
    for value in latencies:
        m.request_duration_seconds.labels("users").observe(value)
    m.requests_in_flight.inc(in_flight)
    m.config_last_reload_success.set(1 if reload_ok else 0)
    m.config_info.set_info(version)
    return r


def test_render_sums_three_workers() -> None:
    me = _worker(2, [0.003], in_flight=1, reload_ok=True, version="v2")
    w1 = _worker(5, [0.003, 0.2], in_flight=4, reload_ok=True, version="v2")
    # a route only another worker has served appears too
    w2 = _worker(1, [40.0], in_flight=0, reload_ok=True, version="v1", orders=3)
    snapshots = [roundtrip(w1.snapshot()), roundtrip(w2.snapshot())]

    _, samples = parse(me.render(extra=snapshots))

    assert samples[key("gateway_requests_total", route="users", method="GET", code="200")] == 8
    assert samples[key("gateway_requests_total", route="orders", method="POST", code="201")] == 3
    assert samples[key("gateway_requests_in_flight")] == 5
    bucket = "gateway_request_duration_seconds_bucket"
    assert samples[key(bucket, route="users", le="0.0025")] == 0
    assert samples[key(bucket, route="users", le="0.005")] == 2
    assert samples[key(bucket, route="users", le="0.25")] == 3
    assert samples[key(bucket, route="users", le="30.0")] == 3
    assert samples[key(bucket, route="users", le="+Inf")] == 4
    assert samples[key("gateway_request_duration_seconds_count", route="users")] == 4
    total = samples[key("gateway_request_duration_seconds_sum", route="users")]
    assert total == pytest.approx(40.206)
    # info: the union of versions in use, each at 1 (not the number of workers)
    assert samples[key("gateway_config_info", version="v2")] == 1
    assert samples[key("gateway_config_info", version="v1")] == 1
    assert samples[key("gateway_config_last_reload_success")] == 1
    # rendering merged values does not change the live ones
    assert me.snapshot() == _worker(2, [0.003], 1, True, "v2").snapshot()


def test_min_merge_reports_a_failed_reload_on_any_worker() -> None:
    me = _worker(0, [], 0, reload_ok=True, version="v1")
    others = [
        roundtrip(_worker(0, [], 0, reload_ok=ok, version="v1").snapshot()) for ok in (True, False)
    ]
    _, samples = parse(me.render(extra=others))
    assert samples[key("gateway_config_last_reload_success")] == 0
    _, mine_only = parse(me.render())
    assert mine_only[key("gateway_config_last_reload_success")] == 1


def _process(cpu: float, rss: float, fds: float, started: float) -> Registry:
    r = Registry()
    m = GatewayMetrics(r)
    m.process_cpu_seconds_total.set_total(cpu)
    m.process_resident_memory_bytes.set(rss)
    m.process_open_fds.set(fds)
    m.process_start_time_seconds.set(started)
    return r


def test_process_metrics_of_workers_add_up_and_start_with_the_oldest() -> None:
    """CPU time, memory and descriptors are the workers' together; the start time is the
    oldest worker's (a restarted one is younger than the gateway)."""
    me = _process(cpu=1.5, rss=100, fds=10, started=1000.0)
    others = [roundtrip(_process(2.0, 200, 20, 900.0).snapshot())]
    others.append(roundtrip(_process(0.25, 50, 5, 1100.0).snapshot()))
    _, samples = parse(me.render(extra=others))
    assert samples[key("process_cpu_seconds_total")] == 3.75
    assert samples[key("process_resident_memory_bytes")] == 350
    assert samples[key("process_open_fds")] == 35
    assert samples[key("process_start_time_seconds")] == 900.0


def test_a_mirrored_counter_is_set_not_added() -> None:
    counter = Registry().counter("cpu_seconds", "CPU.")
    counter.set_total(2.5)
    counter.set_total(3.0)
    assert counter.labels().value == 3.0
    with pytest.raises(TypeError):
        Registry().counter("by_route", "R.", ("route",)).set_total(1)


def test_max_merge_takes_the_largest() -> None:
    def registry(value: float) -> Registry:
        r = Registry()
        r.gauge("peak", "Peak.", merge="max").set(value)
        return r

    _, samples = parse(registry(3).render(extra=[registry(9).snapshot(), registry(1).snapshot()]))
    assert samples[key("peak")] == 9


def test_malformed_snapshots_are_skipped_row_by_row() -> None:
    me = _worker(1, [0.003], 0, True, "v1")
    good = roundtrip(_worker(2, [0.003], 0, True, "v1").snapshot())
    bad: list[Any] = [
        "not a dict",
        {"gateway_requests_total": "not rows"},
        {
            "gateway_requests_total": [
                ["too", "few"],
                [["users", "GET"], 5],
                [["users", "GET", "200"], "x"],
            ]
        },
        {"gateway_requests_total": [[["users", "GET", "200"], True]]},
        {"gateway_request_duration_seconds": [[["users"], [1, 2], 0.1], [["users"], "x", 0.1]]},
        {"gateway_requests_in_flight": None},
    ]
    _, samples = parse(me.render(extra=[*bad, good]))
    assert samples[key("gateway_requests_total", route="users", method="GET", code="200")] == 3
    assert samples[key("gateway_request_duration_seconds_count", route="users")] == 2


def test_snapshot_is_plain_json() -> None:
    r = _worker(3, [0.003, 7.0], 2, True, "v1")
    snapshot = r.snapshot()
    assert roundtrip(snapshot) == snapshot
    assert snapshot["gateway_requests_total"] == [[["users", "GET", "200"], 3.0]]


def test_write_and_read_snapshots_skip_our_own_and_broken_files(tmp_path: Path) -> None:
    _worker(1, [], 0, True, "v1").write_snapshot(str(tmp_path / "worker-0.json"))
    _worker(2, [], 0, True, "v1").write_snapshot(str(tmp_path / "worker-1.json"))
    _worker(4, [], 0, True, "v1").write_snapshot(str(tmp_path / "worker-2.json"))
    (tmp_path / "worker-3.json").write_text('{"gateway_requests_total": [[["us')  # partial
    (tmp_path / "worker-4.json").write_text("[1, 2]")  # not an object
    (tmp_path / "worker-5.json").write_bytes(b"\xff\xfe garbage")
    (tmp_path / "notes.txt").write_text("{}")
    (tmp_path / "worker-6.json").mkdir()  # unreadable as a file

    snapshots = read_snapshots(str(tmp_path), exclude="worker-0.json")

    counts = sorted(s["gateway_requests_total"][0][1] for s in snapshots)
    assert counts == [2.0, 4.0]
    me = _worker(1, [], 0, True, "v1")
    _, samples = parse(me.render(extra=snapshots))
    assert samples[key("gateway_requests_total", route="users", method="GET", code="200")] == 7


def test_read_snapshots_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    assert read_snapshots(str(tmp_path / "absent")) == []


def test_write_snapshot_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "worker-0.json"
    r = Registry()
    c = r.counter("c_total", "C.")
    r.write_snapshot(str(path))
    c.inc(5)
    r.write_snapshot(str(path))
    assert os.listdir(tmp_path) == ["worker-0.json"]
    assert json.loads(path.read_text()) == {"c_total": [[[], 5.0]]}


def test_write_snapshot_failure_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "child").write_text("x")  # os.replace onto a non-empty directory fails
    with pytest.raises(OSError, match="taken"):
        Registry().write_snapshot(str(target))
    assert sorted(os.listdir(tmp_path)) == ["taken"]


# -- OpenMetrics: negotiation, the text, exemplars -------------------------------------------

TRACE_A = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACE_B = "0af7651916cd43dd8448eb211c80319c"
SPAN_A = "00f067aa0ba902b7"
SPAN_B = "b7ad6b7169203331"


def parse_openmetrics(text: str) -> tuple[dict[str, str], list[Sample]]:
    """Family types and samples via the strict OpenMetrics parser (it raises on any error)."""
    families = list(openmetrics_families(text))
    return {f.name: f.type for f in families}, [s for f in families for s in f.samples]


def shown_exemplars(text: str, family: str) -> dict[str, tuple[str, str, float]]:
    """{le: (trace_id, span_id, value)} of the buckets of `family` that carry an exemplar."""
    _, samples = parse_openmetrics(text)
    return {
        s.labels["le"]: (
            s.exemplar.labels["trace_id"],
            s.exemplar.labels["span_id"],
            s.exemplar.value,
        )
        for s in samples
        if s.name == f"{family}_bucket" and s.exemplar is not None
    }


@pytest.mark.parametrize(
    ("accept", "openmetrics"),
    [
        (
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
            "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            True,
        ),
        ("application/openmetrics-text", True),
        ("Application/OpenMetrics-Text; Version=0.0.1", True),
        ("text/plain;q=0.5, application/openmetrics-text;q=0.6", True),
        ('application/openmetrics-text;version="1.0.0"', True),
        ("", False),
        ("*/*", False),
        ("text/plain", False),
        ("text/plain;version=0.0.4;q=0.5,*/*;q=0.1", False),
        ("application/openmetrics-text;version=2.0.0", False),
        ("application/openmetrics-text;q=0", False),
        ("application/openmetrics-text;q=nan", False),
        ("application/openmetrics-text;q=x", False),
        ("text/plain, application/openmetrics-text;q=0.9", False),
        ("application/json", False),
    ],
)
def test_openmetrics_is_answered_when_accept_prefers_it(accept: str, openmetrics: bool) -> None:
    assert wants_openmetrics(accept) is openmetrics


def test_the_gateway_metrics_are_valid_openmetrics() -> None:
    r = Registry()
    m = GatewayMetrics(r)
    m.build_info.set_info("1.2.3", "3.11.7", "true")
    m.config_info.set_info("abc")
    m.requests_total.labels("users", "GET", "200").inc(3)
    m.request_duration_seconds.labels("users").observe(0.003)
    m.upstream_endpoint_up.labels("app", "10.0.0.1:80").set(1)
    m.process_cpu_seconds_total.set_total(1.5)
    text = r.render_openmetrics()
    assert text.endswith("\n# EOF\n")
    types, samples = parse_openmetrics(text)
    prometheus_types, prometheus_samples = parse(r.render())
    # every family is there under its OpenMetrics name, with the same samples
    renamed = {
        ("gateway_requests_total", "gateway_requests"),
        ("gateway_build_info", "gateway_build"),
        ("process_cpu_seconds_total", "process_cpu_seconds"),
    }
    for prometheus_name, openmetrics_name in renamed:
        assert openmetrics_name in types
        assert prometheus_name not in types
    assert types["gateway_requests"] == "counter"
    assert types["gateway_build"] == "info"
    assert types["gateway_config"] == "info"
    assert types["gateway_request_duration_seconds"] == "histogram"
    assert types["gateway_requests_in_flight"] == "gauge"
    assert len(types) == len(prometheus_types)
    assert {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples} == (
        prometheus_samples
    )


def test_openmetrics_escapes_quotes_in_help_and_label_values() -> None:
    r = Registry()
    r.counter("odd", 'Says "hi"\\ and\nmore.', ("path",)).labels('a"b\\c\nd').inc()
    text = r.render_openmetrics()
    assert '# HELP odd Says \\"hi\\"\\\\ and\\nmore.\n' in text
    [family] = openmetrics_families(text)
    assert family.documentation == 'Says "hi"\\ and\nmore.'
    assert family.samples[0].labels == {"path": 'a"b\\c\nd'}


def test_an_info_metric_must_be_named_info() -> None:
    with pytest.raises(ValueError, match="_info"):
        Registry().info("gateway_build", "Build.", ("version",))


def test_an_exemplar_follows_its_bucket_in_openmetrics_only() -> None:
    r = Registry()
    m = GatewayMetrics(r)
    child = m.request_duration_seconds.labels("users")
    plain_before = r.render()
    child.observe(0.00042)
    child.exemplar(0.00042, TRACE_A, SPAN_A)
    child.observe(0.2)
    child.observe(0.003)
    child.exemplar(0.003, TRACE_B, SPAN_B)
    child.observe(0.004)  # a later request that was not sampled keeps the exemplar in place
    assert shown_exemplars(r.render_openmetrics(), "gateway_request_duration_seconds") == {
        "0.0005": (TRACE_A, SPAN_A, 0.00042),
        "0.005": (TRACE_B, SPAN_B, 0.003),
    }
    assert (
        f'{{route="users",le="0.0005"}} 1 # {{trace_id="{TRACE_A}",span_id="{SPAN_A}"}} 0.00042 '
        in r.render_openmetrics()
    )
    # the Prometheus text has no exemplars, and is what it would be without them
    plain = r.render()
    assert TRACE_A not in plain
    assert " # {" not in plain
    twin = Registry()
    twin_child = GatewayMetrics(twin).request_duration_seconds.labels("users")
    for value in (0.00042, 0.2, 0.003, 0.004):
        twin_child.observe(value)
    assert plain == twin.render() != plain_before


def test_a_later_exemplar_in_a_bucket_replaces_the_earlier() -> None:
    r = Registry()
    child = GatewayMetrics(r).request_duration_seconds.labels("users")
    for trace, span in ((TRACE_A, SPAN_A), (TRACE_B, SPAN_B)):
        child.observe(0.0004)
        child.exemplar(0.0004, trace, span)
    assert shown_exemplars(r.render_openmetrics(), "gateway_request_duration_seconds") == {
        "0.0005": (TRACE_B, SPAN_B, 0.0004)
    }


def _with_exemplar(value: float, trace: str, span: str, at: float) -> dict[str, Any]:
    r = Registry()
    child = GatewayMetrics(r).request_duration_seconds.labels("users")
    child.observe(value)
    child.exemplar(value, trace, span)
    assert child.exemplars is not None
    index = child.exemplars.index(next(e for e in child.exemplars if e is not None))
    child.exemplars[index] = (trace, span, value, at)
    return roundtrip(r.snapshot())


def test_workers_exemplars_merge_to_each_buckets_latest() -> None:
    me = Registry()
    mine = GatewayMetrics(me).request_duration_seconds.labels("users")
    mine.observe(0.0004)
    mine.exemplar(0.0004, TRACE_A, SPAN_A)
    assert mine.exemplars is not None
    assert mine.exemplars[0] is not None
    now = mine.exemplars[0][3]
    others = [
        _with_exemplar(0.0003, TRACE_B, SPAN_B, now + 5),  # later, same bucket: wins
        _with_exemplar(0.02, TRACE_B, SPAN_B, now - 5),  # the only one of its bucket
        _with_exemplar(0.0002, "f" * 32, SPAN_B, now - 5),  # earlier than mine: loses
    ]
    assert others[0]["gateway_request_duration_seconds"][0][3][0][:2] == [TRACE_B, SPAN_B]
    text = me.render_openmetrics(extra=others)
    assert shown_exemplars(text, "gateway_request_duration_seconds") == {
        "0.0005": (TRACE_B, SPAN_B, 0.0003),
        "0.025": (TRACE_B, SPAN_B, 0.02),
    }
    # counts add up as in the Prometheus text, and that text still has no exemplars
    _, samples = parse(me.render(extra=others))
    assert samples[key("gateway_request_duration_seconds_count", route="users")] == 4
    assert " # {" not in me.render(extra=others)


@pytest.mark.parametrize(
    "bad",
    [
        "not a list",
        [None] * 3,  # a slot short
        [["x" * 32, SPAN_B, 0.0003, 1e12]] + [None] * 15,  # not hex
        [[TRACE_B, "b7ad", 0.0003, 1e12]] + [None] * 15,  # span id too short
        [[TRACE_B.upper(), SPAN_B, 0.0003, 1e12]] + [None] * 15,
        [[TRACE_B, SPAN_B, 0.7, 1e12]] + [None] * 15,  # value outside the bucket
        [[TRACE_B, SPAN_B, "0.0003", 1e12]] + [None] * 15,
        [[TRACE_B, SPAN_B, 0.0003, None]] + [None] * 15,
        [[TRACE_B, SPAN_B, 0.0003]] + [None] * 15,
        [[TRACE_B, SPAN_B, True, 1e12]] + [None] * 15,
    ],
)
def test_malformed_exemplars_from_other_workers_are_skipped(bad: Any) -> None:
    me = _worker(1, [0.0004], 0, True, "v1")
    other = roundtrip(_worker(1, [0.0003], 0, True, "v1").snapshot())
    other["gateway_request_duration_seconds"][0].append(bad)
    text = me.render_openmetrics(extra=[other])
    assert shown_exemplars(text, "gateway_request_duration_seconds") == {}
    _, samples = parse(me.render(extra=[other]))
    assert samples[key("gateway_request_duration_seconds_count", route="users")] == 2


def test_a_snapshot_carries_exemplars_only_once_a_child_has_one() -> None:
    r = Registry()
    child = GatewayMetrics(r).request_duration_seconds.labels("users")
    child.observe(0.003)
    assert r.snapshot()["gateway_request_duration_seconds"] == [[["users"], child.counts, 0.003]]
    child.exemplar(0.003, TRACE_A, SPAN_A)
    [row] = roundtrip(r.snapshot())["gateway_request_duration_seconds"]
    assert len(row) == 4
    assert row[3][3][:3] == [TRACE_A, SPAN_A, 0.003]
    assert [e for i, e in enumerate(row[3]) if i != 3] == [None] * 15
