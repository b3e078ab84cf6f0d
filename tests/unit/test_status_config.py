"""`status:` (SPEC §8): its one key, its address checked like admin's, and never an address the
admin API or a data listener binds."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ConfigErrors
from tests.support.certs import ensure_dev_certificates
from tests.support.config import load_config, parse_config

REPO = Path(__file__).resolve().parents[2]

LISTENERS = 'listeners: [{name: http, bind: "127.0.0.1:8080"}, {name: v6, bind: "[::1]:8443"}]\n'


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        parse_config(LISTENERS + text, env={})
    return [str(e) for e in info.value.errors]


def test_without_a_status_section_there_is_no_status_listener() -> None:
    assert parse_config(LISTENERS, env={}).status is None


@pytest.mark.parametrize(
    ("bind", "host", "port"),
    [
        ("0.0.0.0:9902", "0.0.0.0", 9902),
        ("127.0.0.1:0", "127.0.0.1", 0),
        ("[::]:9902", "::", 9902),
        # a wildcard of the other family is another socket (asyncio's IPv6 sockets are v6-only)
        ("[::]:8080", "::", 8080),
        ("0.0.0.0:8443", "0.0.0.0", 8443),
        ("status.internal:9902", "status.internal", 9902),
    ],
    ids=["any-v4", "port-0", "any-v6", "v6-wildcard-next-to-v4", "v4-wildcard-next-to-v6", "name"],
)
def test_a_status_bind(bind: str, host: str, port: int) -> None:
    status = parse_config(LISTENERS + f'status: {{bind: "{bind}"}}\n', env={}).status
    assert status is not None
    assert (status.host, status.port) == (host, port)


def test_the_bind_may_come_from_the_environment() -> None:
    text = LISTENERS + 'status: {bind: "${STATUS_BIND:-127.0.0.1:9902}"}\n'
    default = parse_config(text, env={}).status
    assert default is not None
    assert (default.host, default.port) == ("127.0.0.1", 9902)
    given = parse_config(text, env={"STATUS_BIND": "0.0.0.0:9902"}).status
    assert given is not None
    assert (given.host, given.port) == ("0.0.0.0", 9902)


REQUIRED = "status.bind: is required (host:port; leave `status` out for no listener)"
TAKEN = "status.bind: {} already binds this address; give status its own"

CASES = [
    ("empty", "status: {}", [REQUIRED]),
    ("null", "status:", ["status: must be a mapping"]),
    ("not-host-port", 'status: {bind: "9902"}', ["status.bind: must be host:port, not '9902'"]),
    (
        "no-host",
        'status: {bind: ":9902"}',
        ["status.bind: host is missing (use 0.0.0.0 for every interface)"],
    ),
    (
        "port-range",
        'status: {bind: "0.0.0.0:70000"}',
        ["status.bind: port must be between 0 and 65535"],
    ),
    (
        "typo",
        'status: {bnd: "0.0.0.0:9902"}',
        ["status.bnd: unknown key (did you mean 'bind'?)", REQUIRED],
    ),
    ("token", 'status: {bind: "0.0.0.0:9902", token: x}', ["status.token: unknown key"]),
    ("admin-default", 'status: {bind: "127.0.0.1:9901"}', [TAKEN.format("the admin listener")]),
    (
        "admin-given",
        'admin: {bind: "0.0.0.0:7000"}\nstatus: {bind: "127.0.0.1:7000"}',
        [TAKEN.format("the admin listener")],
    ),
    ("listener", 'status: {bind: "127.0.0.1:8080"}', [TAKEN.format("listener 'http'")]),
    ("listener-wildcard", 'status: {bind: "0.0.0.0:8080"}', [TAKEN.format("listener 'http'")]),
    ("listener-v6", 'status: {bind: "[::]:8443"}', [TAKEN.format("listener 'v6'")]),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_status_errors_name_their_path(text: str, expected: list[str]) -> None:
    assert _errors(text + "\n") == expected


def test_port_0_never_clashes() -> None:
    """Port 0 is the system's choice, a different port each time (the tests' configs)."""
    text = 'listeners: [{name: http, bind: "127.0.0.1:0"}]\nadmin: {bind: "127.0.0.1:0"}\n'
    status = parse_config(text + 'status: {bind: "127.0.0.1:0"}\n', env={}).status
    assert status is not None
    assert status.port == 0


def test_the_default_config_keeps_status_on_loopback_unless_told() -> None:
    """`make run` exposes nothing new; a container sets GATEWAY_STATUS_BIND for its probes."""
    ensure_dev_certificates()
    shipped = REPO / "config" / "gateway.yaml"
    status = load_config(shipped, env={}).status
    assert status is not None
    assert (status.host, status.port) == ("127.0.0.1", 9902)
    exposed = load_config(shipped, env={"GATEWAY_STATUS_BIND": "0.0.0.0:9902"}).status
    assert exposed is not None
    assert (exposed.host, exposed.port) == ("0.0.0.0", 9902)
