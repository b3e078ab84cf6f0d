"""The config loader: strict keys, paths in every error, env interpolation, units, version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.config.load import interpolate_env
from gateway.config.units import parse_duration, parse_size
from gateway.errors import ConfigError, ConfigErrors
from tests.support.certs import ensure_dev_certificates
from tests.support.config import load_config, parse_config

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """
listeners: [{name: http, bind: "127.0.0.1:8080"}]
upstreams:
  users: {endpoints: [{url: "http://127.0.0.1:9001"}]}
routes:
  - {name: users, match: {path_prefix: /users}, upstream: users}
"""
LISTENER = 'listeners: [{name: http, bind: "127.0.0.1:8080"}]\n'


def errors_of(
    text: str, env: dict[str, str] | None = None, base_dir: Path | None = None
) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        parse_config(text, env=env or {}, base_dir=base_dir)
    return [str(e) for e in info.value.errors]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("1.5s", 1.5), ("1m", 60.0), ("24h", 86400.0), (" 2s ", 2.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "x") == seconds


@pytest.mark.parametrize("bad", [30, "30", "5 sec", "-1s", "s", True, None, "1d"])
def test_bad_durations_name_the_path(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(bad, "limits.header_timeout")
    assert info.value.path == "limits.header_timeout"


@pytest.mark.parametrize(
    ("value", "size"),
    [(1024, 1024), ("512B", 512), ("16KiB", 16384), ("10MiB", 10 * 2**20), ("1GiB", 2**30)],
)
def test_sizes(value: object, size: int) -> None:
    assert parse_size(value, "x") == size


@pytest.mark.parametrize("bad", ["16KB", "1.5MiB", -1, "big", True])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_size(bad, "limits.max_body_bytes")


def test_minimal_config_gets_defaults() -> None:
    config = parse_config(MINIMAL, env={})
    assert config.listeners[0].host == "127.0.0.1"
    assert config.listeners[0].port == 8080
    assert config.limits.max_header_bytes == 32 * 1024
    assert config.admin.host == "127.0.0.1"
    assert config.admin.port == 9901
    assert config.admin.token is None
    route = config.routes[0]
    assert route.match.path_prefix == "/users"
    assert route.upstreams[0].name == "users"
    assert route.timeout == 30.0
    assert config.upstreams[0].endpoints[0].port == 9001
    assert len(config.version) == 12


def test_unknown_keys_are_errors_with_path_and_hint() -> None:
    text = MINIMAL.replace("{path_prefix: /users}", "{pth: /users}") + "limit: {}\n"
    errors = errors_of(text)
    assert "routes[0].match.pth: unknown key (did you mean 'path'?)" in errors
    assert any(e.startswith("limit: unknown key (did you mean 'limits'?)") for e in errors)


def test_every_error_is_reported_at_once() -> None:
    text = """
listeners: [{name: http, bind: "nowhere"}]
limits: {max_connections: -5, header_timeout: 10}
upstreams:
  users: {endpoints: [{url: "ftp://x"}], balance: random}
routes:
  - {name: a, match: {path: x}, upstream: userz}
  - {name: a, match: {path_regex: "("}, upstream: internal:echo}
"""
    errors = errors_of(text)
    paths = {e.split(":")[0] for e in errors}
    assert {
        "listeners[0].bind",
        "limits.max_connections",
        "limits.header_timeout",
        "upstreams.users.endpoints[0].url",
        "upstreams.users.balance",
        "routes[0].match.path",
        "routes[0].upstream",
        "routes[1].name",
        "routes[1].match.path_regex",
    } <= paths
    assert any("did you mean 'users'" in e for e in errors if e.startswith("routes[0].upstream"))


def test_env_interpolation() -> None:
    assert interpolate_env("a ${X} b", {"X": "1"}) == "a 1 b"
    assert interpolate_env("${Y:-dflt}", {}) == "dflt"
    assert interpolate_env("${Y:-}", {}) == ""
    assert interpolate_env("$${LITERAL}", {}) == "${LITERAL}"
    with pytest.raises(ConfigErrors) as info:
        interpolate_env("${MISSING}", {})
    assert "MISSING" in str(info.value)


def test_env_in_config_keeps_types_and_ignores_comments() -> None:
    text = (
        "# a comment mentioning ${NOT_SET} is never interpolated\n"
        + MINIMAL
        + "limits:\n  max_connections: ${MAXC}\nadmin: {token: '${TOKEN:-}'}\n"
    )
    config = parse_config(text, env={"MAXC": "42"})
    assert config.limits.max_connections == 42
    assert config.admin.token is None
    config = parse_config(text, env={"MAXC": "42", "TOKEN": "s3cret"})
    assert config.admin.token == "s3cret"
    errors = errors_of(text, env={})
    assert errors == ["limits.max_connections: environment variable MAXC is not set"]


def test_an_unset_variable_does_not_hide_the_other_errors() -> None:
    text = (
        MINIMAL.replace("upstream: users}", "upstream: userz}")
        + "admin: {token: '${GATEWAY_ADMIN_TOKEN}'}\nlimits: {max_conections: 5}\n"
    )
    assert errors_of(text) == [
        "admin.token: environment variable GATEWAY_ADMIN_TOKEN is not set",
        "limits.max_conections: unknown key (did you mean 'max_connections'?)",
        "routes[0].upstream: unknown upstream 'userz' (did you mean 'users'?)",
    ]


TLS_EDGE = """
listeners:
  - name: https
    bind: "127.0.0.1:8443"
    tls: {certificates: [{cert: server.crt, key: server.key}], client_ca: "${CLIENT_CA}"}
middlewares:
  idp: {jwt: {algorithms: [HS256], secret: "${JWT_SECRET}"}}
routes:
  - name: r
    upstream: internal:echo
    pipeline:
      - mtls: {}
      - idp
      - rate_limit: {rate: 10, per: 1s, key: "jwt:sub"}
"""
TLS_EDGE_ENV = {"CLIENT_CA": "ca.crt", "JWT_SECRET": "s" * 32}


@pytest.mark.parametrize(
    ("written", "reference", "value", "path"),
    [
        ('"${CLIENT_CA}"', '"${CLIENT_CA}"', "ca.crt", "listeners[0].tls.client_ca"),
        ('"${JWT_SECRET}"', '"${JWT_SECRET}"', "s" * 32, "middlewares.idp.jwt.secret"),
        ('"127.0.0.1:8443"', '"${HOST}:8443"', "127.0.0.1", "listeners[0].bind"),
        ("rate: 10", 'rate: "${RATE}"', "10", "routes[0].pipeline[2].rate_limit.rate"),
        ("upstream: internal:echo", "upstream: ${UP}", "internal:echo", "routes[0].upstream"),
        ("key: server.key", 'key: "${KEY}"', "server.key", "listeners[0].tls.certificates[0].key"),
    ],
    ids=[
        "a-ca-file-an-mtls-stage-needs",
        "a-secret-a-later-stage-needs",
        "part-of-a-value",
        "a-typed-value",
        "a-cross-reference",
        "a-key-file",
    ],
)
def test_an_unset_variable_causes_no_follow_on_error(
    written: str, reference: str, value: str, path: str
) -> None:
    # the value the operator meant is unknown: only the variable is reported, at its path, next
    # to the file's own typo — no error of the empty or unexpanded value, there or elsewhere
    certs = ensure_dev_certificates()
    text = TLS_EDGE.replace(written, reference)
    name = reference.split("${")[1].split("}")[0]
    env = {**TLS_EDGE_ENV, name: value}
    assert parse_config(text, env=env, base_dir=certs).routes  # valid once the variable is set
    del env[name]
    assert errors_of(text + "limit: {}\n", env, certs) == [
        f"{path}: environment variable {name} is not set",
        "limit: unknown key (did you mean 'limits'?)",
    ]


def test_invalid_yaml_reports_line() -> None:
    errors = errors_of("listeners: [\n  - {name: x\n")
    assert len(errors) == 1
    assert "invalid YAML at line" in errors[0]


def test_match_normalization() -> None:
    text = """
listeners: [{name: http, bind: "[::1]:0"}]
routes:
  - name: r
    match:
      host: "API.Example.com:443"
      path_prefix: /api/
      methods: [get, Post]
      headers: {X-Canary: "true"}
    upstream: internal:echo
    strip_prefix: /api/
  - name: w
    match: {host: "*.example.com"}
    upstream: internal:echo
"""
    config = parse_config(text, env={})
    assert config.listeners[0].host == "::1"
    match = config.routes[0].match
    assert match.host == "api.example.com"
    assert match.path_prefix == "/api"
    assert match.methods == ("GET", "POST")
    assert match.headers == (("x-canary", "true"),)
    assert config.routes[0].strip_prefix == "/api"
    assert config.routes[1].match.host == "*.example.com"


def test_weighted_split_and_errors() -> None:
    base = MINIMAL.replace(
        "users: {endpoints",
        "v2: {endpoints: [{url: 'http://127.0.0.1:9002'}]}\n  users: {endpoints",
    )
    config = parse_config(
        base.replace(
            "upstream: users}", "upstream: [{name: users, weight: 9}, {name: v2, weight: 1}]}"
        ),
        env={},
    )
    assert [(u.name, u.weight) for u in config.routes[0].upstreams] == [("users", 9), ("v2", 1)]
    errors = errors_of(
        base.replace(
            "upstream: users}", "upstream: [{name: users, weight: 0}, {name: v2, weight: 0}]}"
        )
    )
    assert errors == ["routes[0].upstream: at least one weight must be > 0"]


def test_trusted_proxies_and_access_log() -> None:
    text = (
        MINIMAL
        + """
trusted_proxies: ["10.0.0.0/8", "192.168.1.10"]
access_log: {sample_ratio: 0.25, always_log_status: 400, exclude_fields: [client]}
"""
    )
    config = parse_config(text, env={})
    assert config.trusted_proxies == ("10.0.0.0/8", "192.168.1.10/32")
    assert config.access_log.sample_ratio == 0.25
    errors = errors_of(MINIMAL + "trusted_proxies: [nope]\naccess_log: {sample_ratio: 2}\n")
    assert "trusted_proxies[0]: is not an IP address or CIDR: 'nope'" in errors
    assert "access_log.sample_ratio: must be between 0 and 1" in errors


def test_duplicate_listeners_and_missing_listeners() -> None:
    errors = errors_of(
        'listeners: [{name: a, bind: "127.0.0.1:80"}, {name: a, bind: "127.0.0.1:80"}]\n'
    )
    assert "listeners[1].name: listener 'a' is defined twice" in errors
    assert "listeners[1].bind: another listener already binds this address" in errors
    assert errors_of("routes: []\n") == ["listeners: at least one listener is required"]


def test_version_changes_with_content_only() -> None:
    first = parse_config(MINIMAL, env={}).version
    assert parse_config(MINIMAL, env={}).version == first
    assert parse_config(MINIMAL + "# a comment\n", env={}).version == first
    assert parse_config(MINIMAL.replace("9001", "9002"), env={}).version != first


def test_load_config_reads_files_and_reports_missing(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(MINIMAL)
    config = load_config(path, env={})
    assert config.source == str(path.resolve())
    with pytest.raises(ConfigErrors) as info:
        load_config(tmp_path / "missing.yaml", env={})
    assert "cannot read" in str(info.value)


@pytest.mark.parametrize(
    ("snippet", "error"),
    [
        ("yes: 1\n", "True: unknown key (did you mean 'routes'?)"),
        ("1: x\n", "1: unknown key"),
        ("2024-01-01: x\n", "2024-01-01: unknown key"),
        (
            "upstreams:\n  a: {endpoints: [{url: 'http://127.0.0.1:9'}]}\n"
            "  7: {endpoints: [{url: 'http://127.0.0.1:9'}]}\n",
            "upstreams.7: an upstream name must be letters, digits, '_', '-' or '.'",
        ),
    ],
    ids=["boolean", "integer", "date", "integer-upstream-name"],
)
def test_keys_yaml_typed_are_errors_not_a_crash(snippet: str, error: str) -> None:
    # next to string keys, a typed key once made the version's sorted JSON raise TypeError
    assert error in errors_of(LISTENER + snippet)


@pytest.mark.parametrize(
    "path",
    [REPO / "config" / "gateway.yaml", *sorted((REPO / "config" / "examples").glob("*.yaml"))],
    ids=lambda p: p.name,
)
def test_shipped_configs_load(path: Path) -> None:
    ensure_dev_certificates()
    config = load_config(path, env={})
    assert config.routes


# -- duplicate keys ----------------------------------------------------------------------------


def duplicates_of(text: str) -> list[str]:
    return [e for e in errors_of(text) if "duplicate key" in e]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            LISTENER
            + """\
routes:
  - name: r
    upstream: internal:echo
    pipeline:
      - headers: {request: {set: {x-a: "1"}}}
      - rate_limit:
          rate: 5
          rate: 500
          per: 1s
""",
            [
                "routes[0].pipeline[1].rate_limit.rate: "
                "duplicate key (line 9; first defined on line 8)"
            ],
            id="nested-in-a-pipeline",
        ),
        pytest.param(
            LISTENER + "routes: []\nroutes:\n  - {name: r, upstream: internal:echo}\n",
            ["routes: duplicate key (line 3; first defined on line 2)"],
            id="top-level",
        ),
        pytest.param(
            LISTENER
            + "limits:\n  max_connections: 1\n  max_connections: 2\n  max_connections: 3\n",
            [
                "limits.max_connections: duplicate key (line 4; first defined on line 3)",
                "limits.max_connections: duplicate key (line 5; first defined on line 3)",
            ],
            id="every-repeat",
        ),
        pytest.param(
            """\
listeners:
  - name: https
    bind: "127.0.0.1:8443"
    tls:
      certificates:
        - {cert: a.crt, key: a.key}
        - {cert: b.crt, key: b.key, cert: c.crt}
""",
            [
                "listeners[0].tls.certificates[1].cert: "
                "duplicate key (line 7; first defined on line 7)"
            ],
            id="in-a-list-of-flow-mappings",
        ),
        pytest.param(
            # the first, discarded `routes:` is checked too
            LISTENER + "routes:\n  - {name: a, name: b}\nroutes: []\n",
            [
                "routes[0].name: duplicate key (line 3; first defined on line 3)",
                "routes: duplicate key (line 4; first defined on line 2)",
            ],
            id="inside-a-discarded-duplicate",
        ),
        pytest.param(
            LISTENER + "1: a\n0x1: b\n",
            ["1: duplicate key (line 3; first defined on line 2)"],
            id="equal-integers",
        ),
        pytest.param(
            LISTENER + "true: a\nyes: b\n",
            ["True: duplicate key (line 3; first defined on line 2)"],
            id="equal-booleans",
        ),
        pytest.param(LISTENER + "'1': a\n1: b\n", [], id="a-string-is-not-an-integer"),
    ],
)
def test_duplicate_keys_are_errors_with_path_and_lines(text: str, expected: list[str]) -> None:
    assert duplicates_of(text) == expected


MERGED = """\
listeners: [{name: http, bind: "127.0.0.1:8080"}]
upstreams:
  base: &base
    endpoints: [{url: "http://127.0.0.1:9001"}]
    balance: round_robin
  slow: &slow
    endpoints: [{url: "http://127.0.0.1:9002"}]
    balance: least_request
  overridden:
    <<: *base
    balance: least_request
  first-merge-wins:
    <<: [*slow, *base]
"""


def test_merge_keys_override_without_being_duplicates() -> None:
    config = parse_config(MERGED, env={})
    balance = {u.name: u.balance for u in config.upstreams}
    assert balance == {
        "base": "round_robin",
        "slow": "least_request",
        "overridden": "least_request",
        "first-merge-wins": "least_request",
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            MERGED + "  twice:\n    <<: *base\n    <<: *slow\n",
            ["upstreams.twice.<<: duplicate key (line 16; first defined on line 15)"],
            id="two-merge-keys",
        ),
        pytest.param(
            MERGED.replace("balance: round_robin", "balance: round_robin\n    balance: x"),
            ["upstreams.base.balance: duplicate key (line 6; first defined on line 5)"],
            id="in-an-anchor-reported-once",
        ),
        pytest.param(
            MERGED + "  inline:\n    <<: {balance: a, balance: b}\n",
            ["upstreams.inline.balance: duplicate key (line 15; first defined on line 15)"],
            id="in-an-inline-merge",
        ),
        pytest.param(
            MERGED.replace("    <<: *base\n", "    balance: x\n    <<: *base\n"),
            ["upstreams.overridden.balance: duplicate key (line 12; first defined on line 10)"],
            id="explicit-twice-around-a-merge",
        ),
    ],
)
def test_duplicate_keys_with_merges(text: str, expected: list[str]) -> None:
    assert duplicates_of(text) == expected


@pytest.mark.parametrize("token", ["has space", 'quote"d', "tab\there", "é"])
def test_an_admin_token_no_client_could_send_is_refused(token: str) -> None:
    quoted = json.dumps(token)
    text = f'listeners: [{{name: http, bind: "127.0.0.1:0"}}]\nadmin: {{token: {quoted}}}\n'
    with pytest.raises(ConfigErrors) as caught:
        parse_config(text)
    [error] = caught.value.errors
    assert error.path == "admin.token"
    assert token not in error.message
