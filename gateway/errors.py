"""Errors the gateway raises.

`GatewayError` subclasses carry the HTTP status and the machine-readable code of SPEC §4; the
server protocol turns any of them into one problem+json response in one place.  `ConfigError`
carries the YAML path of the offending value; `ConfigErrors` gathers every error of one load so
`gateway check` can print them all at once.
"""

from __future__ import annotations

from collections.abc import Iterable


class GatewayError(Exception):
    """An error that becomes a gateway-generated HTTP response."""

    status: int = 500
    code: str = "internal_error"
    title: str = "Internal Server Error"
    #: whether the downstream connection must be closed after the response
    close: bool = False
    #: for upstream failures, what went wrong, as `retry_on` names it: "connect_error" (the
    #: request was never sent), "reset", "timeout"; "overflow" for a full connection pool (never
    #: sent either, and not the upstream's fault: breakers and outlier detection ignore it)
    failure: str = ""

    def __init__(
        self,
        detail: str = "",
        *,
        headers: Iterable[tuple[str, str]] = (),
        close: bool | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers: tuple[tuple[str, str], ...] = tuple(headers)
        if close is not None:
            self.close = close


class BadRequest(GatewayError):
    status, code, title, close = 400, "bad_request", "Bad Request", True


class NoRoute(GatewayError):
    status, code, title = 404, "no_route", "Not Found"


class MethodNotAllowed(GatewayError):
    status, code, title = 405, "method_not_allowed", "Method Not Allowed"

    def __init__(self, allowed: Iterable[str], detail: str = "") -> None:
        allow = ", ".join(sorted(set(allowed)))
        super().__init__(detail or f"allowed methods: {allow}", headers=[("Allow", allow)])


class RequestTimeout(GatewayError):
    status, code, title, close = 408, "request_timeout", "Request Timeout", True


class PayloadTooLarge(GatewayError):
    status, code, title, close = 413, "payload_too_large", "Payload Too Large", True


class HeadersTooLarge(GatewayError):
    status, code, title, close = 431, "headers_too_large", "Request Header Fields Too Large", True


class TooManyConnections(GatewayError):
    """A connection over limits.max_connections or max_connections_per_client."""

    status, code, title, close = 503, "too_many_connections", "Service Unavailable", True


class InternalError(GatewayError):
    """A bug: the traceback goes to the log, never on the wire."""

    status, code, title = 500, "internal_error", "Internal Server Error"


class RewriteInvalid(GatewayError):
    """A rewrite stage's path for this request is refused (it would escape the root, smuggle an
    encoded separator, or is no origin-form path): the operator's rule, not the client's
    request, is at fault, hence a 500 (SPEC §5.8)."""

    status, code, title = 500, "rewrite_invalid", "Internal Server Error"


class IdempotencyKeyMissing(GatewayError):
    status, code, title = 400, "idempotency_key_missing", "Bad Request"


class IdempotencyKeyInvalid(GatewayError):
    status, code, title = 400, "idempotency_key_invalid", "Bad Request"


class IdempotencyKeyInUse(GatewayError):
    status, code, title = 409, "idempotency_key_in_use", "Conflict"


class IdempotencyOutcomeUnknown(GatewayError):
    """The first request with this key may have run — it reached an upstream and no complete
    answer came back — so it is never run again for this key (SPEC §5.5)."""

    status, code, title = 409, "idempotency_outcome_unknown", "Conflict"


class IdempotencyKeyReused(GatewayError):
    status, code, title = 422, "idempotency_key_reused", "Unprocessable Content"


class Unauthenticated(GatewayError):
    status, code, title = 401, "unauthenticated", "Unauthorized"


class ClientCertificateRequired(GatewayError):
    status, code, title = 403, "client_certificate_required", "Forbidden"


class ClientCertificateForbidden(GatewayError):
    status, code, title = 403, "client_certificate_forbidden", "Forbidden"


class IpForbidden(GatewayError):
    """The client's address is denied, or not allowed, by an `ip_filter` stage (SPEC §5.8)."""

    status, code, title = 403, "ip_forbidden", "Forbidden"


class RateLimited(GatewayError):
    status, code, title = 429, "rate_limited", "Too Many Requests"


class UpstreamUnavailable(GatewayError):
    """Refused, reset, closed early, or an invalid response."""

    status, code, title = 502, "upstream_unavailable", "Bad Gateway"
    failure = "reset"


class ConnectFailed(UpstreamUnavailable):
    """No connection could be opened: the request was never sent."""

    failure = "connect_error"


class UpstreamBusy(GatewayError):
    """Every pooled connection stayed busy for `pool.queue_timeout`: the request was never sent.

    A 503 with Retry-After rather than a 502: nothing is wrong with the upstream, the gateway is
    holding back so that it is not flooded (and so that clients who hold connections slowly
    cannot make everyone else wait without bound)."""

    status, code, title = 503, "upstream_busy", "Service Unavailable"
    failure = "overflow"


class NoHealthyUpstream(GatewayError):
    status, code, title = 503, "no_healthy_upstream", "Service Unavailable"


class CircuitOpen(GatewayError):
    status, code, title = 503, "circuit_open", "Service Unavailable"


class StoreUnavailable(GatewayError):
    status, code, title = 503, "store_unavailable", "Service Unavailable"


class UpstreamTimeout(GatewayError):
    status, code, title = 504, "upstream_timeout", "Gateway Timeout"
    failure = "timeout"


class ConnectTimeout(UpstreamTimeout):
    """Connecting took too long: the request was never sent."""

    failure = "connect_error"


class ConfigError(Exception):
    """One configuration error at a YAML path such as ``routes[2].match.path``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


class ConfigErrors(Exception):
    """Every error found in one configuration; raised when there is at least one."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors: tuple[ConfigError, ...] = tuple(errors)
        super().__init__("\n".join(str(e) for e in self.errors))
