"""The `ip_filter` stage: CIDR parsing (IPv4, IPv6, IPv4-mapped), the per-prefix-length lookup
and how it scales, list files, config errors at their YAML paths, and the stage's decisions on
the client address (X-Forwarded-For believed from trusted proxies only)."""

from __future__ import annotations

import ipaddress
import random
import time
from pathlib import Path

import pytest

from gateway.config.reader import Reader
from gateway.errors import IpForbidden
from gateway.http.messages import RequestHead, Response
from gateway.observability.exposition import Registry
from gateway.observability.metrics import GatewayMetrics
from gateway.pipeline import RequestContext
from gateway.stages.ip_filter import (
    EMPTY,
    CidrSet,
    IpFilterConfig,
    IpFilterStage,
    _read_file,
    address_value,
    parse_network,
    read_cidr_file,
)
from tests.support.config import MINIMAL, config_errors, parse_config
from tests.support.context import make_context, make_snapshot

BASE = MINIMAL


def filter_config(value: str, base_dir: Path | None = None) -> IpFilterConfig:
    text = (
        BASE + f"routes:\n  - name: r\n    upstream: u\n    pipeline:\n      - ip_filter: {value}\n"
    )
    config = parse_config(text, env={}, base_dir=base_dir)
    stage = config.routes[0].pipeline[0].config
    assert isinstance(stage, IpFilterConfig)
    return stage


def errors_of(value: str, base_dir: Path | None = None) -> list[str]:
    text = (
        BASE + f"routes:\n  - name: r\n    upstream: u\n    pipeline:\n      - ip_filter: {value}\n"
    )
    return config_errors(text, base_dir=base_dir)


# -- CIDRs and addresses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("10.0.0.0/8", (4, 0x0A000000, 8)),
        ("10.1.2.3/8", (4, 0x0A000000, 8)),  # host bits cleared, as nginx and Envoy do
        ("192.0.2.7", (4, 0xC0000207, 32)),
        ("0.0.0.0/0", (4, 0, 0)),
        ("2001:db8::/32", (6, 0x20010DB8 << 96, 32)),
        ("2001:DB8::1", (6, (0x20010DB8 << 96) + 1, 128)),
        ("::/0", (6, 0, 0)),
        # IPv4-mapped: the IPv4 network it spells
        ("::ffff:10.0.0.0/104", (4, 0x0A000000, 8)),
        ("::ffff:192.0.2.7", (4, 0xC0000207, 32)),
        ("::ffff:0:0/96", (4, 0, 0)),
    ],
)
def test_parse_network(text: str, network: tuple[int, int, int]) -> None:
    assert parse_network(text) == network


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.0/33",
        "10.0.0.0/",
        "10.0.0.0/-1",
        "10.0.0.0/+8",
        "10.0.0.0/ 8",
        "10.0.0",
        "010.0.0.0/8",  # octal or decimal? refused, as Python's ipaddress refuses it
        "10.0.0.0.0",
        "256.0.0.0/8",
        "::/129",
        "2001:db8:::/32",
        "fe80::1%eth0/64",
        "example.com",
        "",
        "10.0.0.0/8 10.1.0.0/16",
    ],
)
def test_parse_network_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"not an IP address or CIDR|prefix length must be"):
        parse_network(text)


def test_address_values() -> None:
    assert address_value("192.0.2.7") == (False, 0xC0000207)
    assert address_value("::ffff:192.0.2.7") == (False, 0xC0000207)
    assert address_value("2001:db8::1") == (True, (0x20010DB8 << 96) + 1)
    assert address_value("fe80::1%eth0") == (True, (0xFE80 << 112) + 1)
    assert address_value("") is None
    assert address_value("not-an-ip") is None


def test_cidr_set_lookups_and_equality() -> None:
    cidrs = [
        "10.0.0.0/8",
        "192.168.1.0/24",
        "203.0.113.9",
        "2001:db8::/32",
        "::ffff:172.16.0.0/108",
    ]
    networks = CidrSet(parse_network(c) for c in cidrs)
    assert networks.size == 5
    assert networks.lengths == 5

    def has(ip: str) -> bool:
        parsed = address_value(ip)
        assert parsed is not None
        return networks.contains(*parsed)

    assert has("10.255.255.255")
    assert not has("11.0.0.0")
    assert has("192.168.1.200")
    assert not has("192.168.2.1")
    assert has("203.0.113.9")
    assert not has("203.0.113.10")
    assert has("::ffff:10.1.2.3")  # a mapped client is looked up as IPv4
    assert has("172.16.5.5")  # a mapped CIDR is an IPv4 one
    assert has("2001:db8:ffff::1")
    assert not has("2001:db9::1")
    assert not has("::a00:1")  # ::10.0.0.1 (IPv4-compatible) is IPv6, not 10.0.0.1
    # the same networks however written and ordered: equal, so a reload keeps the stage
    again = CidrSet(parse_network(c) for c in ["10.1.0.0/8", *reversed(cidrs)])
    assert again == networks
    assert hash(again) == hash(networks)
    assert CidrSet([parse_network("10.0.0.0/9")]) != CidrSet([parse_network("10.0.0.0/8")])
    assert repr(networks) == "CidrSet(5 networks)"


def test_list_files_with_comments() -> None:
    networks, problems = read_cidr_file(
        "# office and VPN\n10.0.0.0/8\n\n  192.0.2.0/24   # the lab\r\n2001:db8::/32\n"
        "10.0.0.300\nnot an address # note\n"
    )
    assert networks == [(4, 0x0A000000, 8), (4, 0xC0000200, 24), (6, 0x20010DB8 << 96, 32)]
    assert problems == [
        "line 6: '10.0.0.300' is not an IP address or CIDR",
        "line 7: 'not an address' is not an IP address or CIDR",
    ]


def test_a_lookup_probes_prefix_lengths_not_networks() -> None:
    """100,000 random IPv4 networks of every length from /8 to /32, and 20,000 IPv6 ones: a
    lookup makes one probe per prefix length present (at most 33 + 129), so it costs about the
    same as with 10 networks.  Times are printed (`pytest -s`), bounded only loosely."""
    rng = random.Random(17)
    networks = [
        (4, rng.getrandbits(32) >> (32 - p) << (32 - p), p)
        for p in (rng.randint(8, 32) for _ in range(100_000))
    ]
    networks += [
        (6, rng.getrandbits(128) >> (128 - p) << (128 - p), p)
        for p in (rng.randint(16, 128) for _ in range(20_000))
    ]
    started = time.perf_counter()
    big = CidrSet(networks)
    built = time.perf_counter() - started
    small = CidrSet(networks[:10])
    assert big.lengths <= 25 + 113
    addresses = [(False, rng.getrandbits(32)) for _ in range(20_000)]
    addresses += [(True, rng.getrandbits(128)) for _ in range(5_000)]
    # every listed network's first address is found
    assert all(big.contains(v == 6, value) for v, value, _ in networks[::97])

    def per_lookup(cidrs: CidrSet) -> float:
        started = time.perf_counter()
        for ipv6, value in addresses:
            cidrs.contains(ipv6, value)
        return (time.perf_counter() - started) / len(addresses)

    big_cost, small_cost = per_lookup(big), per_lookup(small)
    # what the stage replaces: asking each network in turn (ipaddress), on 50 addresses
    scanned = [
        ipaddress.ip_network(f"{ipaddress.IPv4Address(n)}/{p}") for v, n, p in networks if v == 4
    ]
    started = time.perf_counter()
    for _, value in addresses[:50]:
        address = ipaddress.IPv4Address(value)
        any(address in network for network in scanned)
    scan_cost = (time.perf_counter() - started) / 50
    print(
        f"\n120k networks ({big.lengths} prefix lengths) built in {built:.2f}s; lookup "
        f"{big_cost * 1e6:.2f} µs (10 networks: {small_cost * 1e6:.2f} µs); "
        f"a scan of the 100k IPv4 networks: {scan_cost * 1e3:.1f} ms"
    )
    # loose: a scan would be thousands of times slower, a per-network cost hundreds of times
    assert big_cost < 200e-6
    assert big_cost < scan_cost / 100


# -- config ------------------------------------------------------------------------------------


def test_inline_lists_and_a_file(tmp_path: Path) -> None:
    (tmp_path / "blocked.txt").write_text("# abuse\n198.51.100.0/24\n2001:db8:bad::/48\n")
    config = filter_config(
        '{allow: [10.0.0.0/8, "2001:db8::/32"], deny: [10.0.13.0/24], file: blocked.txt}',
        base_dir=tmp_path,
    )
    assert config.allow_only is True
    assert config.allow == CidrSet(parse_network(c) for c in ["10.0.0.0/8", "2001:db8::/32"])
    assert config.deny == CidrSet(
        parse_network(c) for c in ["10.0.13.0/24", "198.51.100.0/24", "2001:db8:bad::/48"]
    )
    assert config.file == str(tmp_path / "blocked.txt")
    assert config.file_list == "deny"


def test_an_allow_file_is_in_force_even_empty(tmp_path: Path) -> None:
    (tmp_path / "allowed.txt").write_text("# nobody yet\n")
    config = filter_config("{file: allowed.txt, file_list: allow}", base_dir=tmp_path)
    assert config.allow_only is True
    assert not config.allow
    # an emptied allow list refuses everyone: it must never open the route to all
    stage = IpFilterStage(config, GatewayMetrics(Registry()).stage_total)
    assert stage.refuses("10.0.0.1")
    assert stage.refuses("2001:db8::1")


@pytest.mark.parametrize(
    ("value", "files", "expected"),
    [
        pytest.param(
            "{allow: [10.0.0.0/8, 10.0.0.0/33, 1.2.3]}",
            {},
            [
                "routes[0].pipeline[0].ip_filter.allow[1]: '10.0.0.0/33': the prefix length must"
                " be 0 to 32",
                "routes[0].pipeline[0].ip_filter.allow[2]: '1.2.3' is not an IP address or CIDR",
            ],
            id="inline",
        ),
        pytest.param(
            "{deny: 10.0.0.0/8}",
            {},
            [
                "routes[0].pipeline[0].ip_filter.deny: must be a list of CIDRs (e.g. [10.0.0.0/8,"
                " 2001:db8::/32])"
            ],
            id="not-a-list",
        ),
        pytest.param(
            "{deny: [8]}",
            {},
            ["routes[0].pipeline[0].ip_filter.deny[0]: must be a CIDR string such as 10.0.0.0/8"],
            id="not-a-string",
        ),
        pytest.param(
            "{}",
            {},
            ["routes[0].pipeline[0].ip_filter: needs at least one of allow, deny or file"],
            id="nothing",
        ),
        pytest.param(
            "{allow: [], deny: []}",
            {},
            ["routes[0].pipeline[0].ip_filter: needs at least one of allow, deny or file"],
            id="empty-lists",
        ),
        pytest.param(
            "{deny: [10.0.0.0/8], file_list: allow}",
            {},
            [
                "routes[0].pipeline[0].ip_filter.file_list: says which list the file's entries"
                " join: it needs a file"
            ],
            id="file-list-without-file",
        ),
        pytest.param(
            "{file: list.txt, file_list: block}",
            {"list.txt": "10.0.0.0/8\n"},
            ["routes[0].pipeline[0].ip_filter.file_list: must be deny or allow"],
            id="file-list-value",
        ),
        pytest.param(
            "{file: missing.txt}",
            {},
            ["routes[0].pipeline[0].ip_filter.file: no such file: {dir}/missing.txt"],
            id="missing-file",
        ),
        pytest.param(
            "{file: list.txt}",
            {"list.txt": "10.0.0.0/8\n# fine\n10.0.0.0/40\n\nten.0.0.0\n"},
            [
                "routes[0].pipeline[0].ip_filter.file: {dir}/list.txt line 3: '10.0.0.0/40': the"
                " prefix length must be 0 to 32",
                "routes[0].pipeline[0].ip_filter.file: {dir}/list.txt line 5: 'ten.0.0.0' is not"
                " an IP address or CIDR",
            ],
            id="bad-lines",
        ),
        pytest.param(
            "{file: list.txt}",
            {"list.txt": "".join(f"bad{i}\n" for i in range(8))},
            [
                *(
                    f"routes[0].pipeline[0].ip_filter.file: {{dir}}/list.txt line {i + 1}:"
                    f" 'bad{i}' is not an IP address or CIDR"
                    for i in range(5)
                ),
                "routes[0].pipeline[0].ip_filter.file: {dir}/list.txt: 3 more bad lines",
            ],
            id="many-bad-lines",
        ),
        pytest.param(
            "{file: list.txt}",
            {"list.txt": b"10.0.0.0/8\n\xff\xfe\n"},
            ["routes[0].pipeline[0].ip_filter.file: {dir}/list.txt is not UTF-8 text"],
            id="binary",
        ),
    ],
)
def test_config_errors_name_their_yaml_path(
    tmp_path: Path, value: str, files: dict[str, str | bytes], expected: list[str]
) -> None:
    for name, content in files.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    assert errors_of(value, base_dir=tmp_path) == [e.format(dir=tmp_path) for e in expected]


def test_a_file_that_cannot_be_read_is_a_config_error(tmp_path: Path) -> None:
    # a directory: reading it fails for every user, root included (a file of mode 0 does not,
    # and the tests run as root).  The loader refuses a path that is no file first ...
    (tmp_path / "list.txt").mkdir()
    assert errors_of("{file: list.txt}", base_dir=tmp_path) == [
        f"routes[0].pipeline[0].ip_filter.file: not a file: {tmp_path / 'list.txt'}"
    ]
    # ... and a read that fails all the same (permissions, I/O) is reported where it failed
    reader = Reader()
    assert _read_file(reader, tmp_path / "list.txt", "f") is EMPTY
    assert [str(e) for e in reader.errors] == [
        f"f: cannot read {tmp_path / 'list.txt'}: Is a directory"
    ]


# -- decisions ---------------------------------------------------------------------------------

TRUSTED = """
listeners: [{name: http, bind: "127.0.0.1:0"}]
trusted_proxies: [10.9.0.0/16, "fd00::/8"]
routes:
  - {name: app, match: {path_prefix: /}, upstream: internal:echo}
"""


class Upstream:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, ctx: RequestContext) -> Response:
        self.calls += 1
        return Response(200, [], b"ok")


async def decide(
    cidrs: str, ip: str, forwarded: str | None = None, *, trusted: bool = False
) -> tuple[bool, RequestContext, GatewayMetrics]:
    """Whether a request from `ip` (with `forwarded` as its X-Forwarded-For) got through."""
    metrics = GatewayMetrics(Registry())
    stage = IpFilterStage(filter_config(cidrs), metrics.stage_total)
    head = RequestHead()
    head.method = "GET"
    if forwarded is not None:
        head.headers = [(b"X-Forwarded-For", forwarded.encode())]
        head.x_forwarded_for = forwarded.encode()
    ctx = make_context(head, snapshot=make_snapshot(TRUSTED), ip=ip, trusted=trusted)
    upstream = Upstream()
    refused: IpForbidden | None = None
    try:
        await stage(ctx, upstream)
    except IpForbidden as exc:
        refused = exc
    if refused is not None:
        assert (refused.status, refused.code) == (403, "ip_forbidden")
    assert upstream.calls == (0 if refused else 1)
    return refused is None, ctx, metrics


ALLOW_DENY = '{allow: [10.0.0.0/8, "2001:db8::/32"], deny: [10.0.13.0/24, "2001:db8:bad::/48"]}'


@pytest.mark.parametrize(
    ("ip", "through"),
    [
        ("10.1.2.3", True),
        ("10.0.13.7", False),  # deny wins over a broader allow
        ("11.0.0.1", False),  # not allowed
        ("::ffff:10.1.2.3", True),  # IPv4-mapped: the IPv4 rules
        ("::ffff:10.0.13.7", False),
        ("2001:db8::1", True),
        ("2001:db8:bad::1", False),
        ("2001:db9::1", False),
        ("", False),  # no IP address at all (a Unix socket): refused
    ],
)
async def test_deny_wins_and_allow_is_exclusive(ip: str, through: bool) -> None:
    passed, ctx, metrics = await decide(ALLOW_DENY, ip)
    assert passed is through
    outcome = "allowed" if through else "denied"
    assert ctx.outcomes == {"ip_filter": outcome}
    assert metrics.stage_total.labels("app", "ip_filter", outcome).value == 1


async def test_deny_alone_lets_the_rest_through() -> None:
    assert (await decide("{deny: [192.0.2.0/24]}", "198.51.100.1"))[0] is True
    assert (await decide("{deny: [192.0.2.0/24]}", "192.0.2.1"))[0] is False
    # an allow that narrows nothing still decides (an exception cannot be carved from a deny)
    assert (await decide("{deny: [192.0.2.0/24], allow: [192.0.2.1]}", "192.0.2.1"))[0] is False


async def test_x_forwarded_for_from_an_untrusted_peer_changes_nothing() -> None:
    # the attacker is 203.0.113.5, denied; it claims to be an allowed address
    cidrs = "{allow: [10.0.0.0/8], deny: [203.0.113.0/24]}"
    assert (await decide(cidrs, "203.0.113.5", "10.1.1.1"))[0] is False
    assert (await decide(cidrs, "203.0.113.5", "10.1.1.1, 10.9.0.1"))[0] is False
    # and an allowed peer cannot get itself refused (or anyone else) by naming a denied one
    assert (await decide(cidrs, "10.1.1.1", "203.0.113.5"))[0] is True


async def test_behind_a_trusted_proxy_the_nearest_untrusted_hop_decides() -> None:
    cidrs = "{allow: [10.0.0.0/8], deny: [203.0.113.0/24, 10.9.0.0/16]}"
    # the proxy 10.9.0.1 (trusted, and itself denied) forwards for 10.1.1.1
    assert (await decide(cidrs, "10.9.0.1", "10.1.1.1", trusted=True))[0] is True
    # the client put a forged hop first: the proxy appended the real one, which decides
    assert (await decide(cidrs, "10.9.0.1", "10.1.1.1, 203.0.113.5", trusted=True))[0] is False
    # a chain of trusted proxies is skipped (IPv6 ones too)
    assert (await decide(cidrs, "10.9.0.1", "10.1.1.1, fd00::7, 10.9.3.3", trusted=True))[0]
    # every hop trusted: the first one is the client
    assert (await decide(cidrs, "10.9.0.1", "10.9.0.2", trusted=True))[0] is False
