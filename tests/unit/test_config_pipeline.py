"""`middlewares:` and route `pipeline:` in the config: entries, ownership, path-precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.model import HealthCheckConfig, OutlierDetectionConfig
from gateway.errors import ConfigErrors
from gateway.stages.circuit_breaker import CircuitBreakerConfig, FallbackConfig, SlowCallConfig
from gateway.stages.headers import HeaderEdits, HeadersConfig
from gateway.stages.idempotency import IdempotencyConfig
from gateway.stages.rate_limit import RateLimitConfig
from gateway.stages.retry import RetryConfig
from tests.support.config import MINIMAL, config_errors, load_config, parse_config
from tests.support.tokens import UNUSABLE_KEYS, EcKey, jwks

BASE = MINIMAL


def errors_of(text: str) -> list[str]:
    return config_errors(BASE + text)


def test_named_and_inline_stages_with_their_owners() -> None:
    config = parse_config(
        BASE
        + """
middlewares:
  secure:
    headers: {response: {set: {X-Frame-Options: DENY}}}
routes:
  - name: r
    upstream: u
    pipeline:
      - secure
      - headers: {request: {set: {X-Env: prod}, remove: [X-Debug]}}
""",
        env={},
    )
    [middleware] = config.middlewares
    [route] = config.routes
    named, inline = route.pipeline
    assert named is middleware
    assert named.owner == "middleware:secure"
    assert named.config == HeadersConfig(response=HeaderEdits(set=(("X-Frame-Options", "DENY"),)))
    assert inline.owner == "route:r:1"
    assert inline.config == HeadersConfig(
        request=HeaderEdits(set=(("X-Env", "prod"),), remove=("X-Debug",))
    )


@pytest.mark.parametrize(
    ("pipeline", "path", "message"),
    [
        ("[secur]", "routes[0].pipeline[0]", "unknown middleware 'secur' (did you mean 'secure'?)"),
        (
            "[{idempotency: {token: {secret: short, client_id: 'header:X-C'}}}]",
            "routes[0].pipeline[0].idempotency.token.secret",
            "at least 32 bytes",
        ),
        (
            "[{idempotency: {token: {secret: " + "s" * 32 + ", client_id: cookie}}}]",
            "routes[0].pipeline[0].idempotency.token.client_id",
            "must be jwt:CLAIM, mtls:san, consumer or header:NAME",
        ),
        (
            "[{idempotency: {token: {secret: " + "s" * 32 + ", client_id: 'jwt:sub'}}}]",
            "routes[0].pipeline[0]",
            "token client_id jwt:sub needs a jwt stage before it",
        ),
        (
            "[{idempotency: {on_store_error: maybe}}]",
            "routes[0].pipeline[0].idempotency.on_store_error",
            "allow or deny",
        ),
        (
            "[{idempotency: {max_response_bytes: 0}}]",
            "routes[0].pipeline[0].idempotency.max_response_bytes",
            "must be > 0",
        ),
        (
            "[{idempotency: {max_keys: 0}}]",
            "routes[0].pipeline[0].idempotency.max_keys",
            "must be > 0",
        ),
        (
            "[{idempotency: {max_bytes: 0}}]",
            "routes[0].pipeline[0].idempotency.max_bytes",
            "must be > 0",
        ),
        (
            "[{idempotency: {max_bytes: 512KiB}}]",
            "routes[0].pipeline[0].idempotency.max_bytes",
            "at least max_response_bytes (1048576)",
        ),
        (
            "[{idempotency: {scope: cookie}}]",
            "routes[0].pipeline[0].idempotency.scope",
            "must be auto, none, client_ip, header:NAME, jwt:CLAIM, consumer or mtls:san",
        ),
        (
            "[{idempotency: {scope: 'jwt:sub'}}]",
            "routes[0].pipeline[0]",
            "idempotency scope jwt:sub needs a jwt stage before it",
        ),
        (
            "[{idempotency: {scope: 'mtls:san'}}]",
            "routes[0].pipeline[0]",
            "idempotency scope mtls:san needs a mtls stage before it",
        ),
        (
            "[{jwt: {algorithms: [none], secret: " + "s" * 32 + "}}]",
            "routes[0].pipeline[0].jwt.algorithms[0]",
            "'none' is never accepted",
        ),
        (
            "[{jwt: {algorithms: [HS256, RS256], jwks_url: 'http://idp/jwks'}}]",
            "routes[0].pipeline[0].jwt.algorithms",
            "cannot be mixed",
        ),
        (
            "[{jwt: {algorithms: [HS256], jwks_url: 'http://idp/jwks'}}]",
            "routes[0].pipeline[0].jwt.algorithms",
            "HS* algorithms need a secret",
        ),
        (
            "[{jwt: {algorithms: [RS256], secret: " + "s" * 32 + "}}]",
            "routes[0].pipeline[0].jwt.algorithms",
            "a secret verifies HMAC algorithms (HS*) only",
        ),
        (
            "[{jwt: {algorithms: [HS256], secret: short}}]",
            "routes[0].pipeline[0].jwt.secret",
            "at least 32 bytes",
        ),
        (
            "[{jwt: {algorithms: [RS256]}}]",
            "routes[0].pipeline[0].jwt",
            "exactly one key source",
        ),
        (
            "[{jwt: {algorithms: [RS256], jwks_url: 'http://idp/j', forward_claims: {sub: Host}}}]",
            "routes[0].pipeline[0].jwt.forward_claims.sub",
            "set by the gateway itself",
        ),
        (
            "[{jwt: {algorithms: [RS256], jwks_url: 'http://idp/j', "
            "forward_claims: {sub: authorization}}}]",
            "routes[0].pipeline[0].jwt.forward_claims.sub",
            "Authorization carries the token this stage checks",
        ),
        (
            "[{jwt: {algorithms: [HS256], secret: "
            + "s" * 32
            + "}}, {jwt: {algorithms: [RS256], jwks_url: 'http://idp/j'}}]",
            "routes[0].pipeline",
            "cannot share a route",
        ),
        ("[{rate_limit: {rate: -1}}]", "routes[0].pipeline[0].rate_limit.rate", "must be > 0"),
        ("[{rate_limit: {per: 1s}}]", "routes[0].pipeline[0].rate_limit.rate", "is required"),
        (
            "[{rate_limit: {rate: 1, key: [client_ip, ip]}}]",
            "routes[0].pipeline[0].rate_limit.key[1]",
            "unknown key kind 'ip'",
        ),
        (
            "[{rate_limit: {rate: 1, key: 'header:'}}]",
            "routes[0].pipeline[0].rate_limit.key",
            "unknown key kind",
        ),
        (
            "[{rate_limit: {rate: 1, key: 'jwt:sub'}}]",
            "routes[0].pipeline[0]",
            "key jwt:sub needs a jwt stage before it",
        ),
        (
            "[{rate_limit: {rate: 1, store: shared}}]",
            "routes[0].pipeline[0].rate_limit.store",
            "unknown store 'shared'",
        ),
        (
            "[{rate_limit: {rate: 1, on_store_error: maybe}}]",
            "routes[0].pipeline[0].rate_limit.on_store_error",
            "allow or deny",
        ),
        (
            "[{circuit_breaker: {failure_ratio: 2}}]",
            "routes[0].pipeline[0].circuit_breaker.failure_ratio",
            "must be > 0 and <= 1, not 2",
        ),
        (
            "[{circuit_breaker: {open_for: 10s, max_open_for: 5s}}]",
            "routes[0].pipeline[0].circuit_breaker.max_open_for",
            "at least open_for",
        ),
        (
            "[{circuit_breaker: {slow_call: {duration: 1s}}}]",
            "routes[0].pipeline[0].circuit_breaker.slow_call.ratio",
            "is required",
        ),
        (
            "[{circuit_breaker: {failure_statuses: [503, 999]}}]",
            "routes[0].pipeline[0].circuit_breaker.failure_statuses[1]",
            "HTTP status",
        ),
        (
            "[{retry: {attempts: 0}}]",
            "routes[0].pipeline[0].retry.attempts",
            "must be > 0",
        ),
        (
            "[{retry: {retry_on: [reset, conect_error]}}]",
            "routes[0].pipeline[0].retry.retry_on[1]",
            "did you mean 'connect_error'?",
        ),
        (
            "[{retry: {retry_on: [200]}}]",
            "routes[0].pipeline[0].retry.retry_on[0]",
            "only error statuses",
        ),
        (
            "[{retry: {backoff: {base: 1s, max: 10ms}}}]",
            "routes[0].pipeline[0].retry.backoff.max",
            "at least base",
        ),
        (
            "[{retry: {budget: {ratio: 0}}}]",
            "routes[0].pipeline[0].retry.budget.ratio",
            "must be > 0",
        ),
        ("[{headerz: {}}]", "routes[0].pipeline[0].headerz", "did you mean 'headers'?"),
        ("[{headers: {}, retry: {}}]", "routes[0].pipeline[0]", "one stage kind"),
        ("{headers: {}}", "routes[0].pipeline", "must be a list"),
        (
            "[{headers: {request: {set: {Host: x}}}}]",
            "routes[0].pipeline[0].headers.request.set.Host",
            "set by the gateway itself",
        ),
        (
            "[{headers: {response: {remove: [Content-Length]}}}]",
            "routes[0].pipeline[0].headers.response.remove[0]",
            "set by the gateway itself",
        ),
        (
            '[{headers: {response: {set: {X-A: "a\\r\\nX-B: b"}}}}]',
            "routes[0].pipeline[0].headers.response.set.X-A",
            "no line breaks",
        ),
        (
            '[{headers: {request: {set: {"bad name": x}}}}]',
            "routes[0].pipeline[0].headers.request.set.bad name",
            "must be a header name",
        ),
        ("[{headers: {reqest: {}}}]", "routes[0].pipeline[0].headers.reqest", "did you mean"),
    ],
)
def test_errors_name_the_yaml_path(pipeline: str, path: str, message: str) -> None:
    errors = errors_of(
        f"""
middlewares:
  secure: {{headers: {{}}}}
routes:
  - {{name: r, upstream: u, pipeline: {pipeline}}}
"""
    )
    assert any(e.startswith(f"{path}: ") and message in e for e in errors), errors


def test_a_broken_middleware_is_reported_once() -> None:
    errors = errors_of(
        """
middlewares:
  limits: {rate_limit: {rate: -1}}
  two: {headers: {}, retry: {}}
routes:
  - {name: r, upstream: u, pipeline: [limits, two]}
"""
    )
    assert errors == [
        "middlewares.limits.rate_limit.rate: must be > 0",
        "middlewares.two: must be a mapping with one stage kind, e.g. {headers: {...}}",
    ]


def test_resilience_stages_with_defaults_and_values() -> None:
    config = parse_config(
        BASE
        + """
routes:
  - name: r
    upstream: u
    pipeline:
      - rate_limit: {rate: 5, per: 1m, key: [route, "header:X-Api-Key"]}
      - circuit_breaker: {slow_call: {duration: 2s, ratio: 0.8}, fallback: {status: 200}}
      - retry: {attempts: 3, per_try_timeout: 2s, retry_on: [connect_error, timeout, 503]}
""",
        env={},
    )
    limit, breaker, retry = (s.config for s in config.routes[0].pipeline)
    assert limit == RateLimitConfig(rate=5.0, per=60.0, burst=5, key=("route", "header:x-api-key"))
    assert breaker == CircuitBreakerConfig(
        slow_call=SlowCallConfig(duration=2.0, ratio=0.8), fallback=FallbackConfig(status=200)
    )
    assert retry == RetryConfig(
        attempts=3,
        per_try_timeout=2.0,
        retry_on=("connect_error", "timeout"),
        retry_statuses=(503,),
    )


def test_health_check_and_outlier_detection() -> None:
    config = parse_config(
        """
listeners: [{name: http, bind: "127.0.0.1:8080"}]
upstreams:
  u:
    endpoints: [{url: "http://127.0.0.1:9001"}]
    health_check: {path: /ready, interval: 2s, timeout: 500ms, healthy: 1}
    outlier_detection: {consecutive_failures: 3, ejection: 10s}
""",
        env={},
    )
    [upstream] = config.upstreams
    assert upstream.health_check == HealthCheckConfig(
        path="/ready", interval=2.0, timeout=0.5, healthy=1
    )
    assert upstream.outlier_detection == OutlierDetectionConfig(
        consecutive_failures=3, ejection=10.0
    )


@pytest.mark.parametrize(
    ("snippet", "path", "message"),
    [
        ("health_check: {interval: 1s, timeout: 2s}", "health_check.timeout", "longer than"),
        ("health_check: {path: healthz}", "health_check.path", "must start with /"),
        ("health_check: {unhealthy: 0}", "health_check.unhealthy", "must be > 0"),
        ("health_check: {intervall: 1s}", "health_check.intervall", "did you mean 'interval'"),
        (
            "outlier_detection: {max_ejected_percent: 120}",
            "outlier_detection.max_ejected_percent",
            "between 0 and 100",
        ),
        (
            "outlier_detection: {ejection: 1m, max_ejection: 30s}",
            "outlier_detection.max_ejection",
            "at least ejection",
        ),
    ],
)
def test_health_errors_name_the_yaml_path(snippet: str, path: str, message: str) -> None:
    with pytest.raises(ConfigErrors) as info:
        parse_config(
            f"""
listeners: [{{name: http, bind: "127.0.0.1:8080"}}]
upstreams:
  u: {{endpoints: [{{url: "http://127.0.0.1:9001"}}], {snippet}}}
""",
            env={},
        )
    errors = [str(e) for e in info.value.errors]
    assert any(e.startswith(f"upstreams.u.{path}: ") and message in e for e in errors), errors


def test_jwks_file_is_read_at_load_and_secrets_stay_out_of_reprs(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    (tmp_path / "gateway.yaml").write_text(
        BASE
        + """
routes:
  - name: r
    upstream: u
    pipeline: [{jwt: {algorithms: [ES256], jwks_file: bad.json}}]
"""
    )
    with pytest.raises(ConfigErrors) as info:
        load_config(str(tmp_path / "gateway.yaml"))
    [error] = [str(e) for e in info.value.errors]
    assert error.startswith(
        "routes[0].pipeline[0].jwt.jwks_file: the JWKS holds no usable signature key for ES256"
    )
    assert "a key without kid (symmetric: a symmetric (oct) key does not belong" in error
    # unusable keys beside a good one: skipped, and the config loads
    (tmp_path / "bad.json").write_bytes(jwks(*[e for _, e, _ in UNUSABLE_KEYS], EcKey("good")))
    assert load_config(str(tmp_path / "gateway.yaml")).routes[0].name == "r"
    secret = "correct-horse-battery-staple-0123456789"
    config = parse_config(
        BASE
        + f"""
routes:
  - {{name: r, upstream: u, pipeline: [{{jwt: {{algorithms: [HS256], secret: {secret}}}}}]}}
""",
        env={},
    )
    spec = config.routes[0].pipeline[0]
    assert secret not in repr(spec)
    assert secret not in repr(config)


JWT = "{jwt: {algorithms: [HS256], secret: " + "s" * 32 + "}}"


@pytest.mark.parametrize(
    ("pipeline", "scope"),
    [
        ("[{idempotency: {}}]", "none"),
        (f"[{JWT}, {{idempotency: {{}}}}]", "jwt:sub"),
        (f"[{JWT}, {{idempotency: {{scope: client_ip}}}}]", "client_ip"),
        ("[{idempotency: {scope: 'header:X-Tenant'}}]", "header:x-tenant"),
    ],
    ids=["alone", "after-jwt", "explicit", "header"],
)
def test_idempotency_scope_auto_follows_the_earlier_stages(pipeline: str, scope: str) -> None:
    config = parse_config(BASE + f"routes: [{{name: r, upstream: u, pipeline: {pipeline}}}]")
    [idempotency] = [s.config for s in config.routes[0].pipeline if s.kind == "idempotency"]
    assert idempotency == IdempotencyConfig(scope=scope)


def test_an_idempotency_middleware_must_scope_alike_in_every_route() -> None:
    middlewares = f"""
middlewares:
  auth: {JWT}
  once: {{idempotency: {{}}}}
  pinned: {{idempotency: {{scope: none}}}}
"""
    config = parse_config(
        BASE
        + middlewares
        + """
routes:
  - {name: a, upstream: u, pipeline: [auth, once]}
  - {name: b, upstream: u, pipeline: [auth, once, pinned]}
  - {name: c, upstream: u, pipeline: [pinned]}
""",
        env={},
    )
    scopes = {
        r.name: [s.config.scope for s in r.pipeline if isinstance(s.config, IdempotencyConfig)]
        for r in config.routes
    }
    assert scopes == {"a": ["jwt:sub"], "b": ["jwt:sub", "none"], "c": ["none"]}
    errors = errors_of(
        middlewares
        + """
routes:
  - {name: a, upstream: u, pipeline: [auth, once]}
  - {name: b, upstream: u, pipeline: [once]}
"""
    )
    assert errors == [
        "routes[1].pipeline[0]: middleware 'once' has scope: auto, which is jwt:sub in"
        " routes[0].pipeline[1] but none here (one instance serves both): set its scope"
    ]


JWT_FORWARDING = (
    "{jwt: {algorithms: [HS256], secret: " + "s" * 32 + ", forward_claims: {sub: X-User}}}"
)


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        (
            f"[{{idempotency: {{}}}}, {JWT}]",
            "routes[0].pipeline[0]: idempotency must come after the jwt stage "
            "(routes[0].pipeline[1])",
        ),
        (
            f"[{{idempotency: {{scope: 'header:X-Tenant'}}}}, {JWT}]",
            "routes[0].pipeline[0]: idempotency must come after the jwt stage",
        ),
        (
            f"[{JWT_FORWARDING}, {{idempotency: {{scope: 'header:x-user'}}}}]",
            "routes[0].pipeline[1]: idempotency scope header:x-user names a header the jwt stage"
            " sets",
        ),
        (
            f"[{JWT_FORWARDING}, {{rate_limit: {{rate: 5, key: 'header:X-User'}}}}]",
            "routes[0].pipeline[1]: rate-limit key header:x-user names a header the jwt stage sets",
        ),
    ],
    ids=[
        "idempotency-before-jwt",
        "header-scope-before-jwt",
        "scope-on-forwarded",
        "key-on-forwarded",
    ],
)
def test_orders_and_keys_that_could_never_work_are_refused(pipeline: str, message: str) -> None:
    """Found by probing: idempotency before jwt replayed an authenticated answer to anyone."""
    errors = errors_of(f"routes: [{{name: r, upstream: u, pipeline: {pipeline}}}]")
    assert any(e.startswith(message) for e in errors), errors
