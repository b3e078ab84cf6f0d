"""`middlewares:` and route `pipeline:` in the config: entries, ownership, path-precise errors."""

from __future__ import annotations

import pytest

from gateway.config.load import parse_config
from gateway.config.model import HeaderEdits, HeadersConfig
from gateway.errors import ConfigErrors

BASE = """
listeners: [{name: http, bind: "127.0.0.1:8080"}]
upstreams:
  u: {endpoints: [{url: "http://127.0.0.1:9001"}]}
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        parse_config(BASE + text, env={})
    return [str(e) for e in info.value.errors]


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
        ("[{rate_limit: {rate: 1}}]", "routes[0].pipeline[0].rate_limit", "not supported yet"),
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
  limits: {rate_limit: {rate: 1}}
  two: {headers: {}, retry: {}}
routes:
  - {name: r, upstream: u, pipeline: [limits, two]}
"""
    )
    assert errors == [
        "middlewares.limits.rate_limit: not supported yet (arrives with rate limiting)",
        "middlewares.two: must be a mapping with one stage kind, e.g. {headers: {...}}",
    ]
