"""The route index: compiled once per snapshot; `match()` -> the route's payload, 404 or 405.

Selection (SPEC §2): every route whose host, path, methods and headers all match is a
candidate, and the most specific wins, compared in this order:

1. host: exact > "*." wildcard (a longer suffix beats a shorter one) > any host;
2. path: exact > prefix (longer beats shorter) > regex (in file order) > no path matcher;
3. a route with header matchers beats one without; then file order.

The index mirrors that order, so `match()` visits buckets from the most specific down and the
first route that accepts the request wins.  Cost does not grow with the number of routes: hosts
are dict lookups (one per label for wildcards), prefixes are dict lookups walked from the
longest candidate prefix of the request path down segment by segment (cost proportional to the
path's depth), and only the routes sharing one host and one path key are scanned for methods and
headers.  The exception is `path_regex`: the regexes of one host are tried one by one, which is
acceptable because they are rare and tried only after every exact and prefix bucket failed.

Paths given to `match()` are already normalized (gateway.http.path), and hosts already reduced
to their lower-case name (gateway.http.host), so string comparison is exact comparison.
Finding a route allocates only the substrings of the prefix walk.

A route with `case_insensitive: true` is indexed under its lower-cased path in a second pair of
dicts (and its regex compiled with IGNORECASE), so `/API/x` reaches the same route as `/api/x`
and its stages; the walk then looks a candidate up in both, and the more specific — or, equally
specific, the earlier — route wins.  Host buckets without such routes take the plain walk.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar, final

from gateway.config.model import MatchConfig
from gateway.errors import ConfigError, MethodNotAllowed, NoRoute

T = TypeVar("T")


class HeaderSource(Protocol):
    def get_header(self, name: str) -> str | None:
        """The first value of header `name` (given in lower case), or None."""
        ...


@final
class _Route(Generic[T]):
    __slots__ = ("headers", "index", "methods", "payload", "rank")

    def __init__(self, match: MatchConfig, index: int, payload: T) -> None:
        self.methods = None if match.methods is None else frozenset(match.methods)
        self.headers = match.headers
        self.index = index
        self.payload = payload
        #: the order within a bucket: routes with header matchers first, then file order
        self.rank = (not match.headers, index)

    def accepts_headers(self, source: HeaderSource) -> bool:
        return all(source.get_header(name) == value for name, value in self.headers)


def _first(bucket: tuple[_Route[T], ...], method: str, source: HeaderSource) -> _Route[T] | None:
    """The first route of a bucket (already in precedence order) that accepts the request."""
    for route in bucket:
        methods = route.methods
        if (methods is None or method in methods) and (
            not route.headers or route.accepts_headers(source)
        ):
            return route
    return None


def _ordered(routes: list[_Route[T]]) -> tuple[_Route[T], ...]:
    return tuple(sorted(routes, key=lambda r: r.rank))


def _first_of(
    a: tuple[_Route[T], ...] | None,
    b: tuple[_Route[T], ...] | None,
    method: str,
    source: HeaderSource,
) -> _Route[T] | None:
    """`_first` over two buckets of the same specificity (case-sensitive and not) as one."""
    first_a = _first(a, method, source) if a is not None else None
    first_b = _first(b, method, source) if b is not None else None
    if first_a is None:
        return first_b
    if first_b is None or first_a.rank < first_b.rank:
        return first_a
    return first_b


@final
class _PathIndex(Generic[T]):
    """The routes of one host bucket, indexed by their path matcher."""

    __slots__ = (
        "any_path",
        "exact",
        "exact_ci",
        "has_ci",
        "longest_prefix",
        "prefixes",
        "prefixes_ci",
        "regexes",
    )

    def __init__(self) -> None:
        self.exact: dict[str, tuple[_Route[T], ...]] = {}
        self.prefixes: dict[str, tuple[_Route[T], ...]] = {}
        #: case-insensitive routes, keyed by their lower-cased path or prefix
        self.exact_ci: dict[str, tuple[_Route[T], ...]] = {}
        self.prefixes_ci: dict[str, tuple[_Route[T], ...]] = {}
        self.has_ci = False
        #: no prefix is longer than this: the walk starts there, whatever the path's depth
        self.longest_prefix = 0
        self.regexes: tuple[tuple[re.Pattern[str], tuple[_Route[T], ...]], ...] = ()
        self.any_path: tuple[_Route[T], ...] = ()

    @classmethod
    def build(cls, routes: list[tuple[MatchConfig, _Route[T]]]) -> _PathIndex[T]:
        exact: dict[str, list[_Route[T]]] = {}
        prefixes: dict[str, list[_Route[T]]] = {}
        exact_ci: dict[str, list[_Route[T]]] = {}
        prefixes_ci: dict[str, list[_Route[T]]] = {}
        # keyed by pattern text and case flag: routes sharing one are a bucket, ranked by headers
        regexes: dict[tuple[str, bool], list[_Route[T]]] = {}
        any_path: list[_Route[T]] = []
        for match, route in routes:
            ci = match.case_insensitive
            if match.path is not None:
                if ci:
                    exact_ci.setdefault(match.path.lower(), []).append(route)
                else:
                    exact.setdefault(match.path, []).append(route)
            elif match.path_prefix is not None:
                if ci:
                    prefixes_ci.setdefault(match.path_prefix.lower(), []).append(route)
                else:
                    prefixes.setdefault(match.path_prefix, []).append(route)
            elif match.path_regex is not None:
                regexes.setdefault((match.path_regex, ci), []).append(route)
            else:
                any_path.append(route)
        index = cls()
        index.exact = {path: _ordered(rs) for path, rs in exact.items()}
        index.prefixes = {prefix: _ordered(rs) for prefix, rs in prefixes.items()}
        index.exact_ci = {path: _ordered(rs) for path, rs in exact_ci.items()}
        index.prefixes_ci = {prefix: _ordered(rs) for prefix, rs in prefixes_ci.items()}
        index.has_ci = bool(exact_ci or prefixes_ci)
        index.longest_prefix = max(map(len, [*prefixes, *prefixes_ci]), default=0)
        ranked = sorted(regexes.items(), key=lambda item: min(r.index for r in item[1]))
        index.regexes = tuple(
            (_compile(pattern, ci, min(r.index for r in rs)), _ordered(rs))
            for (pattern, ci), rs in ranked
        )
        index.any_path = _ordered(any_path)
        return index

    def find(self, path: str, method: str, source: HeaderSource) -> _Route[T] | None:
        """The most specific route of this host bucket that accepts the request."""
        if self.has_ci:
            return self._find_mixed(path, method, source)
        if self.exact:
            bucket = self.exact.get(path)
            if bucket is not None:
                route = _first(bucket, method, source)
                if route is not None:
                    return route
        if self.prefixes:
            # the walk of `_prefix_buckets`, inlined: this is the hot path and it stops at the
            # first bucket with an accepting route, without building a list
            prefixes = self.prefixes
            limit = self.longest_prefix
            size = len(path)
            if size <= limit:
                bucket = prefixes.get(path)
                if bucket is not None:
                    route = _first(bucket, method, source)
                    if route is not None:
                        return route
            slash = path.rfind("/", 0, limit + 1)
            while slash >= 0:
                if slash + 1 < size:
                    bucket = prefixes.get(path[: slash + 1])
                    if bucket is not None:
                        route = _first(bucket, method, source)
                        if route is not None:
                            return route
                if slash:
                    bucket = prefixes.get(path[:slash])
                    if bucket is not None:
                        route = _first(bucket, method, source)
                        if route is not None:
                            return route
                slash = path.rfind("/", 0, slash)
        return self._find_regex_or_any(path, method, source)

    def _find_regex_or_any(self, path: str, method: str, source: HeaderSource) -> _Route[T] | None:
        for pattern, bucket in self.regexes:
            if pattern.fullmatch(path) is not None:
                route = _first(bucket, method, source)
                if route is not None:
                    return route
        if self.any_path:
            return _first(self.any_path, method, source)
        return None

    def _find_mixed(self, path: str, method: str, source: HeaderSource) -> _Route[T] | None:
        """`find` when some routes ignore case: each key is looked up in both dicts."""
        # ASCII only (the path is normalized), so `lower` has the same length and slashes
        lower = path.lower()
        route = _first_of(self.exact.get(path), self.exact_ci.get(lower), method, source)
        if route is not None:
            return route
        prefixes = self.prefixes
        prefixes_ci = self.prefixes_ci
        for end in self._prefix_ends(path):
            route = _first_of(
                prefixes.get(path[:end]), prefixes_ci.get(lower[:end]), method, source
            )
            if route is not None:
                return route
        return self._find_regex_or_any(path, method, source)

    def _prefix_ends(self, path: str) -> list[int]:
        """Lengths of the candidate prefixes of `path`, longest first (see `_prefix_buckets`)."""
        limit = self.longest_prefix
        size = len(path)
        ends: list[int] = []
        if size <= limit:
            ends.append(size)
        slash = path.rfind("/", 0, limit + 1)
        while slash >= 0:
            if slash + 1 < size:
                ends.append(slash + 1)
            if slash:
                ends.append(slash)
            slash = path.rfind("/", 0, slash)
        return ends

    def _prefix_buckets(self, path: str) -> list[tuple[_Route[T], ...]]:
        """Buckets of the prefixes that match `path` on a segment boundary, longest first.

        A prefix "/a" matches "/a" and "/a/...", and "/a/" matches "/a/...": so the candidates
        are the path itself, then for each "/" from the right the text up to and including it,
        then the text before it.  Prefixes are at most `longest_prefix` long, so slashes beyond
        that are never looked at (the text before a slash at `limit` still fits).
        """
        lower = path.lower()
        found: list[tuple[_Route[T], ...]] = []
        for end in self._prefix_ends(path):
            bucket = self.prefixes.get(path[:end])
            if bucket is not None:
                found.append(bucket)
            bucket = self.prefixes_ci.get(lower[:end])
            if bucket is not None:
                found.append(bucket)
        return found

    def collect_allowed(self, path: str, source: HeaderSource, allowed: set[str]) -> None:
        """Add the methods of routes matching path and headers (the 405 case, off the hot path)."""
        buckets: list[tuple[_Route[T], ...]] = []
        for bucket in (self.exact.get(path), self.exact_ci.get(path.lower())):
            if bucket is not None:
                buckets.append(bucket)
        if self.prefixes or self.prefixes_ci:
            buckets.extend(self._prefix_buckets(path))
        buckets.extend(b for pattern, b in self.regexes if pattern.fullmatch(path) is not None)
        buckets.append(self.any_path)
        for routes in buckets:
            for route in routes:
                if route.methods is not None and route.accepts_headers(source):
                    allowed.update(route.methods)


def _compile(pattern: str, case_insensitive: bool, index: int) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.IGNORECASE if case_insensitive else 0)
    except re.error as exc:
        # the loader validates regexes; this keeps a bad one a config error, not a crash
        raise ConfigError(f"routes[{index}].match.path_regex", f"invalid regex: {exc}") from exc


def _config_host_key(host: str) -> str:
    # an IPv6 literal may be written with or without brackets in the config
    return host.lower().strip("[]").rstrip(".")


@final
class Router(Generic[T]):
    """Routes indexed by host, then by path; see the module docstring for the precedence."""

    __slots__ = ("_any_host", "_by_host", "_by_wildcard", "_count", "_has_host_routes")

    def __init__(
        self,
        by_host: dict[str, _PathIndex[T]],
        by_wildcard: dict[str, _PathIndex[T]],
        any_host: _PathIndex[T] | None,
        count: int,
    ) -> None:
        self._by_host = by_host
        #: "*.example.com" is stored under "example.com"
        self._by_wildcard = by_wildcard
        self._any_host = any_host
        self._has_host_routes = bool(by_host or by_wildcard)
        self._count = count

    @classmethod
    def build(cls, routes: Sequence[tuple[MatchConfig, int, T]]) -> Router[T]:
        """Index `(match, file index, payload)` triples; the config is already validated."""
        exact: dict[str, list[tuple[MatchConfig, _Route[T]]]] = {}
        wildcard: dict[str, list[tuple[MatchConfig, _Route[T]]]] = {}
        any_host: list[tuple[MatchConfig, _Route[T]]] = []
        for match, index, payload in routes:
            entry = (match, _Route(match, index, payload))
            if match.host is None:
                any_host.append(entry)
            elif match.host.startswith("*."):
                wildcard.setdefault(match.host[2:].lower(), []).append(entry)
            else:
                exact.setdefault(_config_host_key(match.host), []).append(entry)
        return cls(
            {host: _PathIndex.build(rs) for host, rs in exact.items()},
            {suffix: _PathIndex.build(rs) for suffix, rs in wildcard.items()},
            _PathIndex.build(any_host) if any_host else None,
            len(routes),
        )

    def __len__(self) -> int:
        return self._count

    def match(self, host: str | None, path: str, method: str, headers: HeaderSource) -> T:
        """The payload of the most specific route; raises NoRoute or MethodNotAllowed.

        `host` is the normalized host name (`gateway.http.host`: lower case, no port, no trailing
        dot, IPv6 without brackets), "" or None; `path` is normalized; `method` is upper case.
        """
        if self._has_host_routes and host:
            name = host
            index = self._by_host.get(name)
            if index is not None:
                route = index.find(path, method, headers)
                if route is not None:
                    return route.payload
            wildcards = self._by_wildcard
            if wildcards:
                # "*.example.com" is keyed "example.com": try every suffix after a dot, longest
                # first; the apex itself is never a key looked up here
                dot = name.find(".")
                while dot >= 0:
                    index = wildcards.get(name[dot + 1 :])
                    if index is not None:
                        route = index.find(path, method, headers)
                        if route is not None:
                            return route.payload
                    dot = name.find(".", dot + 1)
        if self._any_host is not None:
            route = self._any_host.find(path, method, headers)
            if route is not None:
                return route.payload
        allowed = self._allowed_methods(host, path, headers)
        if allowed:
            raise MethodNotAllowed(allowed)
        raise NoRoute(f"no route for {path}")

    def _wildcards(self, name: str) -> list[_PathIndex[T]]:
        """Wildcard buckets matching `name`, longest suffix first; never the apex itself."""
        found: list[_PathIndex[T]] = []
        dot = name.find(".")
        while dot >= 0:
            index = self._by_wildcard.get(name[dot + 1 :])
            if index is not None:
                found.append(index)
            dot = name.find(".", dot + 1)
        return found

    def _allowed_methods(self, host: str | None, path: str, source: HeaderSource) -> set[str]:
        """Union of the methods of routes that match everything but the method."""
        indexes: list[_PathIndex[T]] = []
        if self._has_host_routes and host:
            name = host
            index = self._by_host.get(name)
            if index is not None:
                indexes.append(index)
            indexes.extend(self._wildcards(name))
        if self._any_host is not None:
            indexes.append(self._any_host)
        allowed: set[str] = set()
        for index in indexes:
            index.collect_allowed(path, source, allowed)
        return allowed
