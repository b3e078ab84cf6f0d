"""The gateway's metrics (SPEC §9): which exist, their names, help and labels, declared once.

The families and children the data plane updates are in instruments.py; the registry, the text
format and /metrics across workers in exposition.py.
"""

from __future__ import annotations

from gateway.observability.exposition import Registry


class GatewayMetrics:
    """Every metric of SPEC §9 the gateway records, each declared once, here."""

    def __init__(self, registry: Registry) -> None:
        r = registry
        self.registry = registry
        self.requests_total = r.counter(
            "gateway_requests_total", "Requests answered.", ("route", "method", "code")
        )
        self.request_duration_seconds = r.histogram(
            "gateway_request_duration_seconds", "Request head to response end.", ("route",)
        )
        # the access log's bytes_in and bytes_out, counted in the same place (ServerState.record)
        self.request_bytes_total = r.counter(
            "gateway_request_bytes_total",
            "Request body bytes received from clients (the access log's bytes_in).",
            ("route",),
        )
        self.response_bytes_total = r.counter(
            "gateway_response_bytes_total",
            "Response bytes written to clients, status line and headers included (the access"
            " log's bytes_out).",
            ("route",),
        )
        self.requests_in_flight = r.gauge("gateway_requests_in_flight", "Requests in progress.")
        self.connections_active = r.gauge(
            "gateway_connections_active", "Open client connections.", ("listener",)
        )
        self.connections_refused_total = r.counter(
            "gateway_connections_refused_total",
            "Client connections refused (answered 503 too_many_connections, or closed at once in"
            ' a flood): over limits.max_connections (reason "max_connections") or'
            ' limits.max_connections_per_client ("per_client"); on the admin and status'
            ' listeners, over their 256 connections (closed at once).',
            ("listener", "reason"),
        )
        self.upstream_evictions_total = r.counter(
            "gateway_upstream_evictions_total",
            "Pooled upstream connections taken back from clients that had stopped reading their"
            " response while other requests waited for a connection.",
            ("upstream",),
        )
        self.slow_clients_total = r.counter(
            "gateway_slow_clients_total",
            'Connections cut for sending a request body (direction "upload") or reading a'
            ' response ("download") slower than limits.min_data_rate.',
            ("listener", "direction"),
        )
        self.upstream_request_duration_seconds = r.histogram(
            "gateway_upstream_request_duration_seconds",
            "Request sent upstream to response head received.",
            ("upstream",),
        )
        self.upstream_responses_total = r.counter(
            "gateway_upstream_responses_total",
            "Response heads received from upstreams (every try), by status class: 1xx (101"
            " only: interim responses are not counted) to 5xx.",
            ("upstream", "class"),
        )
        self.upstream_connect_duration_seconds = r.histogram(
            "gateway_upstream_connect_duration_seconds", "Upstream TCP connect.", ("upstream",)
        )
        self.upstream_tls_handshake_duration_seconds = r.histogram(
            "gateway_upstream_tls_handshake_duration_seconds",
            "Upstream TLS handshake, after the TCP connect.",
            ("upstream",),
        )
        self.upstream_connections_total = r.counter(
            "gateway_upstream_connections_total",
            "Upstream connections taken, by whether a pooled one was reused.",
            ("upstream", "reused"),
        )
        self.upstream_busy_total = r.counter(
            "gateway_upstream_busy_total",
            "Requests answered 503 upstream_busy: no pooled connection to the upstream freed"
            " within pool.queue_timeout (never sent).",
            ("upstream",),
        )
        self.upstream_attempts_total = r.counter(
            "gateway_upstream_attempts_total",
            "Exchanges with an endpoint, by result: a failure is a connect error, reset,"
            " timeout, invalid response, 502/503/504, or a response body cut short (judged when"
            " the body ends) — what outlier detection counts.",
            ("upstream", "endpoint", "result"),
        )
        # summed over workers: each runs its own outlier detection on its own requests
        self.outlier_ejections_total = r.counter(
            "gateway_outlier_ejections_total",
            "Endpoints taken out of rotation by outlier detection.",
            ("upstream", "endpoint"),
        )
        # min over workers: each runs its own checks; one that cannot reach it says 0
        self.upstream_endpoint_up = r.gauge(
            "gateway_upstream_endpoint_up",
            "1 while an endpoint is healthy and not ejected.",
            ("upstream", "endpoint"),
            merge="min",
        )
        # max over workers: a breaker open in any worker shows
        self.circuit_breaker_state = r.gauge(
            "gateway_circuit_breaker_state",
            "Circuit state: 0 closed, 1 open, 2 half-open.",
            ("route", "upstream"),
            merge="max",
        )
        self.circuit_breaker_transitions_total = r.counter(
            "gateway_circuit_breaker_transitions_total",
            "Circuit state changes, by the state entered.",
            ("route", "upstream", "to"),
        )
        self.rate_limited_total = r.counter(
            "gateway_rate_limited_total", "Requests refused with 429.", ("route",)
        )
        self.rate_limit_store_errors_total = r.counter(
            "gateway_rate_limit_store_errors_total",
            "Rate-limit store failures (the request fell back or was refused).",
            ("route",),
        )
        # min over workers: a store any worker cannot reach shows as down
        self.store_up = r.gauge(
            "gateway_store_up",
            "1 while a shared store's last operation succeeded, 0 after it failed.",
            ("store",),
            merge="min",
        )
        self.store_operations_total = r.counter(
            "gateway_store_operations_total",
            'Operations on a shared store by outcome: "ok", "error" (refused, unreachable, an'
            ' error reply), "timeout" (no answer within the store\'s timeout) or "backoff" (not'
            " tried: it failed moments ago).",
            ("store", "outcome"),
        )
        self.store_operation_duration_seconds = r.histogram(
            "gateway_store_operation_duration_seconds",
            "Shared store operations, from the call to the answer or the failure.",
            ("store",),
        )
        self.idempotency_total = r.counter(
            "gateway_idempotency_total",
            "Requests with idempotency keys, by what became of them.",
            ("route", "outcome"),
        )
        # the route label is the stage's: a named middleware's records are one set
        self.idempotency_evictions_total = r.counter(
            "gateway_idempotency_evictions_total",
            "Completed idempotency records dropped before their ttl to stay within max_keys or"
            " max_bytes (a repeat of one runs again).",
            ("route",),
        )
        self.idempotency_records = r.gauge(
            "gateway_idempotency_records",
            "Idempotency records held in memory, in-flight locks included.",
            ("route",),
        )
        self.idempotency_records_bytes = r.gauge(
            "gateway_idempotency_records_bytes",
            "Bytes of idempotency records counted against max_bytes (keys, stored responses).",
            ("route",),
        )
        # SPEC §5.8: what the operator stages (rewrite, redirect, cors, ip_filter, api_key,
        # basic_auth, mirror, compress) decided; each kind's outcomes are a fixed set
        self.stage_total = r.counter(
            "gateway_stage_total",
            "Decisions of the operator stages, by stage kind and outcome.",
            ("route", "stage", "outcome"),
        )
        self.jwt_total = r.counter(
            "gateway_jwt_total", "Bearer tokens checked, by result.", ("route", "result")
        )
        # reasons are gateway.core.jwt_tokens.SkipReason, a fixed set
        self.jwt_keys_skipped_total = r.counter(
            "gateway_jwt_keys_skipped_total",
            "JWKS entries left out because they cannot verify tokens, each time a set is read.",
            ("reason",),
        )
        # reason: the failure retried, a `retry_on` kind (connect_error, reset, timeout) or
        # "status" for a retried response status — a fixed set
        self.retries_total = r.counter(
            "gateway_retries_total",
            "Upstream attempts after the first, by the failure of the try before.",
            ("route", "upstream", "reason"),
        )
        self.retry_budget_exhausted_total = r.counter(
            "gateway_retry_budget_exhausted_total",
            "Retries not made because the upstream's retry budget was spent.",
            ("upstream",),
        )
        self.tls_certificate_not_after_seconds = r.gauge(
            "gateway_tls_certificate_not_after_seconds",
            "When each listener certificate expires (Unix time).",
            ("name",),
            merge="min",
        )
        self.tracing_spans_dropped_total = r.counter(
            "gateway_tracing_spans_dropped_total",
            'Finished spans not exported: the export queue was full (reason "queue_full"), the'
            ' collector refused them or could not be reached in time ("export_failed"), or the'
            ' tracer had been closed ("shutdown").',
            ("reason",),
        )
        self.tracing_spans_exported_total = r.counter(
            "gateway_tracing_spans_exported_total", "Spans the collector accepted."
        )
        self.config_reloads_total = r.counter(
            "gateway_config_reloads_total", "Configuration reloads by result.", ("result",)
        )
        # min over workers: one worker that rejected the reload makes the gateway's answer 0
        self.config_last_reload_success = r.gauge(
            "gateway_config_last_reload_success", "1 if the last reload succeeded.", merge="min"
        )
        self.config_last_reload_success.set(1)
        # info (merge max): the union over workers of the versions in use, each at 1
        self.config_info = r.info(
            "gateway_config_info", "Configuration version in use.", ("version",)
        )
        # info (merge max): the union of builds running (one, but for a rolling upgrade)
        self.build_info = r.info(
            "gateway_build_info",
            "The gateway's version, the Python running it, and whether its hot path is compiled.",
            ("version", "python", "compiled"),
        )
        # the process_* names every Prometheus client library exports, read from the kernel
        # (observability/process.py) whenever /metrics is rendered or a worker publishes; with
        # several workers, CPU time, memory and descriptors add up, and the start time is the
        # oldest worker's (the supervisor, which serves no requests, is not counted)
        self.process_cpu_seconds_total = r.counter(
            "process_cpu_seconds_total", "Total user and system CPU time spent in seconds."
        )
        self.process_resident_memory_bytes = r.gauge(
            "process_resident_memory_bytes", "Resident memory size in bytes."
        )
        self.process_open_fds = r.gauge("process_open_fds", "Number of open file descriptors.")
        self.process_start_time_seconds = r.gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            merge="min",
        )
