"""The `ip_filter` stage (SPEC §5.8): allow and deny CIDR lists on the client's address.

The address is the one rate limits key on (`gateway.identity.client_ip`): the peer's, or behind
`trusted_proxies` the nearest untrusted `X-Forwarded-For` hop, so a client that is not a trusted
proxy cannot choose it by sending the header.  An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
what a dual-stack socket reports for an IPv4 client) is that IPv4 address, and a CIDR written in
that form is an IPv4 one.  Deny wins; when an allow list is in force (`allow` not empty, or
`file_list: allow`) an address it does not contain is refused.  Refusal: 403 `ip_forbidden`.

Lookup is one hash-set probe per prefix length present in the list (`CidrSet`): at most 33 for
IPv4 and 129 for IPv6 whatever the number of CIDRs, and in real lists a handful.  A binary trie
would walk up to 32 or 128 nodes in interpreted steps per lookup; a probe per length is one
shift and one set lookup, done by the interpreter's C code, and only for the lengths present.

`file:` names a list of one CIDR a line (`#` comments).  It is read when the config is loaded,
so a broken file is a config error naming its path and line, and it is one of the files the
gateway watches: a change reloads the config, which rebuilds this stage with the new list; an
unreadable or invalid file rejects that reload whole (logged, counted in
`gateway_config_reloads_total{result="failure"}`) and the previous list keeps serving.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from socket import AF_INET, AF_INET6, inet_pton
from typing import Any, Final, final

from gateway.config.model import StageSpec
from gateway.config.reader import Fields, Nested, Reader, choice
from gateway.errors import IpForbidden
from gateway.http.messages import Response
from gateway.identity import client_ip
from gateway.observability.instruments import Counter, CounterChild
from gateway.pipeline import Next, RequestContext
from gateway.stages.kind import BuildContext, StageKind

#: (IP version 4 or 6, network address as an integer, prefix length)
Network = tuple[int, int, int]
#: (bits to shift an address right, the networks of that prefix length shifted alike), by length
_Table = tuple[tuple[int, frozenset[int]], ...]

_MAPPED: Final = 0xFFFF  # an IPv4-mapped IPv6 address is ::ffff:a.b.c.d: this over the low 32 bits
_MAPPED_PREFIX: Final = b"\x00" * 10 + b"\xff\xff"
_V4_BITS: Final = 0xFFFFFFFF
#: bad lines of a file reported one by one before the rest are only counted
_SHOWN_PROBLEMS: Final = 5


def parse_network(text: str) -> Network:
    """`a.b.c.d[/n]` or `ipv6[/n]` (a bare address is a /32 or /128); host bits are cleared, as
    nginx and Envoy do (`10.1.2.3/8` is 10.0.0.0/8).  ValueError says what is wrong."""
    address, slash, length = text.partition("/")
    try:
        if ":" in address:
            bits = 128
            value = int.from_bytes(inet_pton(AF_INET6, address), "big")
        else:
            bits = 32
            value = int.from_bytes(inet_pton(AF_INET, address), "big")
    except (OSError, ValueError):
        raise ValueError(f"{text!r} is not an IP address or CIDR") from None
    prefix = bits
    if slash:
        # int() would take " 8", "+8" or "٨": a prefix is ASCII digits only
        if not length.isascii() or not length.isdigit() or int(length) > bits:
            raise ValueError(f"{text!r}: the prefix length must be 0 to {bits}")
        prefix = int(length)
    if bits == 128 and prefix >= 96 and value >> 32 == _MAPPED:
        # ::ffff:10.0.0.0/104 is 10.0.0.0/8: clients in that form are looked up as IPv4
        return 4, value & _V4_BITS & ~((1 << (128 - prefix)) - 1), prefix - 96
    host_bits = bits - prefix
    return (6 if bits == 128 else 4), value >> host_bits << host_bits, prefix


def address_value(ip: str) -> tuple[bool, int] | None:
    """(whether IPv6, the address as an integer) for a client address, an IPv4-mapped one read
    as IPv4; None when it is not an IP address."""
    # the four bytes put together by hand: compiled, int.from_bytes is a generic call that costs
    # twice the parse
    try:
        if ":" not in ip:
            b = inet_pton(AF_INET, ip)
            return False, b[0] << 24 | b[1] << 16 | b[2] << 8 | b[3]
        zone = ip.find("%")
        if zone >= 0:  # fe80::1%eth0, as a socket may report a link-local peer
            ip = ip[:zone]
        b = inet_pton(AF_INET6, ip)
    except (OSError, ValueError):
        return None
    if b[:12] == _MAPPED_PREFIX:
        return False, b[12] << 24 | b[13] << 16 | b[14] << 8 | b[15]
    return True, int.from_bytes(b, "big")


def _contains(table: _Table, value: int) -> bool:
    # mypyc turns any() over a generator into a plain loop that stops at the first hit
    return any(value >> shift in networks for shift, networks in table)


@final
class CidrSet:
    """An immutable set of networks of both families, looked up by one probe per prefix length
    present (see the module's docstring).  Equal sets compare equal, so a reload that leaves a
    list unchanged leaves its stage in place."""

    __slots__ = ("_v4", "_v6", "size")

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        by_length: dict[tuple[int, int], set[int]] = {}
        for version, value, prefix in networks:
            host_bits = (32 if version == 4 else 128) - prefix
            by_length.setdefault((version, prefix), set()).add(value >> host_bits)
        v4: list[tuple[int, frozenset[int]]] = []
        v6: list[tuple[int, frozenset[int]]] = []
        # shortest prefixes first: where lists overlap, the broad ones hold the most addresses
        for (version, prefix), shifted in sorted(by_length.items()):
            if version == 4:
                v4.append((32 - prefix, frozenset(shifted)))
            else:
                v6.append((128 - prefix, frozenset(shifted)))
        self._v4: _Table = tuple(v4)
        self._v6: _Table = tuple(v6)
        #: distinct networks held
        self.size = sum(len(s) for _, s in v4) + sum(len(s) for _, s in v6)

    def __bool__(self) -> bool:
        return self.size > 0

    def __len__(self) -> int:
        return self.size

    def contains(self, ipv6: bool, value: int) -> bool:
        """Whether an address (as `address_value` reads it) is in one of the networks."""
        return _contains(self._v6 if ipv6 else self._v4, value)

    @property
    def lengths(self) -> int:
        """How many prefix lengths are present: the probes a lookup that misses makes."""
        return len(self._v4) + len(self._v6)

    def union(self, other: CidrSet) -> CidrSet:
        return CidrSet([*self.networks(), *other.networks()])

    def networks(self) -> list[Network]:
        result: list[Network] = []
        for version, table in ((4, self._v4), (6, self._v6)):
            bits = 32 if version == 4 else 128
            for shift, shifted in table:
                result += [(version, n << shift, bits - shift) for n in shifted]
        return result

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CidrSet) and self._v4 == other._v4 and self._v6 == other._v6

    def __hash__(self) -> int:
        return hash((self.size, tuple(s for s, _ in self._v4), tuple(s for s, _ in self._v6)))

    def __repr__(self) -> str:
        # a list may hold 100k networks: configs are printed in errors and logs
        return f"CidrSet({self.size} networks)"


EMPTY: Final = CidrSet()


def read_cidr_file(text: str) -> tuple[list[Network], list[str]]:
    """The networks of a list file (one CIDR a line, `#` starts a comment, blank lines
    ignored), and a description of each bad line."""
    networks: list[Network] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.partition("#")[0].strip()
        if not entry:
            continue
        try:
            networks.append(parse_network(entry))
        except ValueError as exc:
            problems.append(f"line {number}: {exc}")
    return networks, problems


@dataclass(frozen=True, slots=True, kw_only=True)
class IpFilterConfig:
    #: the networks allowed and denied: the inline lists, and the file's entries in the list
    #: `file_list` names
    allow: CidrSet = field(default=EMPTY)
    deny: CidrSet = field(default=EMPTY)
    file: str | None = None
    #: which list the file's entries join
    file_list: str = "deny"
    #: whether anything not allowed is refused: `allow` was given non-empty, or the file is an
    #: allow list (then even when it is empty: an emptied allow list must not open the route)
    allow_only: bool = False


EXAMPLE: Final = """\
allow: [10.0.0.0/8, "2001:db8::/32"]
deny: [10.0.13.0/24]
"""


def _cidrs(r: Reader, raw: object, path: str) -> CidrSet | None:
    if not isinstance(raw, list):
        r.error(path, "must be a list of CIDRs (e.g. [10.0.0.0/8, 2001:db8::/32])")
        return None
    networks: list[Network] = []
    for i, item in enumerate(raw):
        try:
            if not isinstance(item, str):
                raise ValueError("must be a CIDR string such as 10.0.0.0/8")
            networks.append(parse_network(item.strip()))
        except ValueError as exc:
            r.error(f"{path}[{i}]", str(exc))
    return CidrSet(networks)


_FIELDS: Final = Fields(
    IpFilterConfig,
    {
        "allow": Nested(_cidrs),
        "deny": Nested(_cidrs),
        "file_list": choice("deny", "allow"),
    },
    # read with the file's content
    extra=("file",),
)


def parse(r: Reader, raw: object, path: str) -> IpFilterConfig | None:
    m = _FIELDS.mapping(r, raw, path)
    if m is None:
        return None
    errors = len(r.errors)
    values = _FIELDS.values(r, m, path)
    values["allow_only"] = bool(values["allow"])
    if m.get("file") is not None:
        where = f"{path}.file"
        found = r.resolve_file(m["file"], where)
        if found is not None:
            values["file"] = str(found)
            listed = _read_file(r, found, where)
            if values["file_list"] == "allow":
                values["allow"] = values["allow"].union(listed)
                values["allow_only"] = True
            else:
                values["deny"] = values["deny"].union(listed)
    elif "file_list" in m:
        r.error(f"{path}.file_list", "says which list the file's entries join: it needs a file")
    if not m.get("allow") and not m.get("deny") and m.get("file") is None:
        r.error(path, "needs at least one of allow, deny or file")
    return _FIELDS.create(r, values, path, errors)


def _read_file(r: Reader, found: Path, where: str) -> CidrSet:
    try:
        text = found.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        r.error(where, f"cannot read {found}: {exc.strerror or exc}")
        return EMPTY
    except UnicodeDecodeError:
        r.error(where, f"{found} is not UTF-8 text")
        return EMPTY
    networks, problems = read_cidr_file(text)
    for problem in problems[:_SHOWN_PROBLEMS]:
        r.error(where, f"{found} {problem}")
    if len(problems) > _SHOWN_PROBLEMS:
        r.error(where, f"{found}: {len(problems) - _SHOWN_PROBLEMS} more bad lines")
    return CidrSet(networks)


def _describe(config: IpFilterConfig) -> dict[str, Any]:
    # counts, not the lists: a list may hold 100k networks
    described: dict[str, Any] = {
        "allow_networks": len(config.allow),
        "deny_networks": len(config.deny),
        "allow_only": config.allow_only,
    }
    if config.file is not None:
        described |= {"file": config.file, "file_list": config.file_list}
    return described


#: the metrics' outcomes (gateway_stage_total{stage="ip_filter"})
ALLOWED: Final = "allowed"
DENIED: Final = "denied"


@final
class IpFilterStage:
    __slots__ = (
        "_allow",
        "_allow_only",
        "_counted",
        "_deny",
        "_last_ipv6",
        "_last_refused",
        "_last_value",
        "_total",
    )

    def __init__(self, config: IpFilterConfig, total: Counter) -> None:
        self._allow = config.allow
        self._deny = config.deny
        self._allow_only = config.allow_only
        self._total = total
        #: route -> (allowed, denied) counters
        self._counted: dict[str, tuple[CounterChild, CounterChild]] = {}
        #: the last address judged (its family and value; -1: none yet) and the verdict: a
        #: client's next request, or the next client behind the same address, is two integer
        #: compares, not a probe per prefix length (~0.5k instructions).  The lists never
        #: change: a reload that changes them builds another stage
        self._last_ipv6 = False
        self._last_value = -1
        self._last_refused = True

    def refuses(self, ip: str) -> bool:
        """Whether a request from `ip` is refused: denied, or not allowed by an allow list in
        force.  Something that is not an IP address (no real peer address) is refused."""
        return self.refuses_address(address_value(ip))

    def refuses_address(self, parsed: tuple[bool, int] | None) -> bool:
        """`refuses` for an address already read by `address_value`."""
        if parsed is None:
            return True
        ipv6, value = parsed
        if self._deny.contains(ipv6, value):
            return True
        return self._allow_only and not self._allow.contains(ipv6, value)

    def _counters(self, route: str) -> tuple[CounterChild, CounterChild]:
        counters = self._counted.get(route)
        if counters is None:
            total = self._total
            counters = self._counted[route] = (
                total.labels(route, "ip_filter", ALLOWED),
                total.labels(route, "ip_filter", DENIED),
            )
        return counters

    def __call__(self, ctx: RequestContext, call_next: Next) -> Awaitable[Response]:
        """Not a coroutine: nothing is left to do once the request goes on, so the rest of the
        pipeline's awaitable is returned as it is; a refusal raises here, at the call, which
        every caller makes in the same expression as its await (`await call_next(ctx)`)."""
        allowed, denied = self._counters(ctx.route.name)
        peer = ctx.peer
        if peer.trusted and ctx.head.x_forwarded_for:
            # the client is an X-Forwarded-For hop: read with each request
            parsed = address_value(client_ip(ctx))
        elif peer.address_read:
            parsed = peer.address  # the connection's own address, read by an earlier request
        else:
            parsed = peer.address = address_value(peer.ip)
            peer.address_read = True
        if parsed is None:
            refused = True  # not an IP address: no real peer to judge
        else:
            ipv6, value = parsed
            if value == self._last_value and ipv6 == self._last_ipv6:
                refused = self._last_refused
            else:
                refused = self.refuses_address(parsed)
                self._last_ipv6 = ipv6
                self._last_value = value
                self._last_refused = refused
        if refused:
            denied.inc()
            ctx.outcome("ip_filter", DENIED)
            raise IpForbidden("requests from this address are not accepted on this route")
        allowed.inc()
        ctx.outcome("ip_filter", ALLOWED)
        return call_next(ctx)


def build(config: IpFilterConfig, spec: StageSpec, env: BuildContext) -> IpFilterStage:
    return IpFilterStage(config, env.metrics.stage_total)


KIND: Final[StageKind[IpFilterConfig, IpFilterStage]] = StageKind(
    name="ip_filter", parse=parse, build=build, example=EXAMPLE, describe=_describe
)
