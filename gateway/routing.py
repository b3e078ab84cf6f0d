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

Paths given to `match()` are already normalized (gateway.http.path), so string comparison is
exact comparison.  Finding a route allocates only the host key and the substrings of the prefix
walk.
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
    __slots__ = ("headers", "index", "methods", "payload")

    def __init__(self, match: MatchConfig, index: int, payload: T) -> None:
        self.methods = None if match.methods is None else frozenset(match.methods)
        self.headers = match.headers
        self.index = index
        self.payload = payload

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
    return tuple(sorted(routes, key=lambda r: (not r.headers, r.index)))


@final
class _PathIndex(Generic[T]):
    """The routes of one host bucket, indexed by their path matcher."""

    __slots__ = ("any_path", "exact", "longest_prefix", "prefixes", "regexes")

    def __init__(self) -> None:
        self.exact: dict[str, tuple[_Route[T], ...]] = {}
        self.prefixes: dict[str, tuple[_Route[T], ...]] = {}
        #: no prefix is longer than this: the walk starts there, whatever the path's depth
        self.longest_prefix = 0
        self.regexes: tuple[tuple[re.Pattern[str], tuple[_Route[T], ...]], ...] = ()
        self.any_path: tuple[_Route[T], ...] = ()

    @classmethod
    def build(cls, routes: list[tuple[MatchConfig, _Route[T]]]) -> _PathIndex[T]:
        exact: dict[str, list[_Route[T]]] = {}
        prefixes: dict[str, list[_Route[T]]] = {}
        # keyed by pattern text: routes sharing a regex are one bucket, ranked by headers
        regexes: dict[str, list[_Route[T]]] = {}
        any_path: list[_Route[T]] = []
        for match, route in routes:
            if match.path is not None:
                exact.setdefault(match.path, []).append(route)
            elif match.path_prefix is not None:
                prefixes.setdefault(match.path_prefix, []).append(route)
            elif match.path_regex is not None:
                regexes.setdefault(match.path_regex, []).append(route)
            else:
                any_path.append(route)
        index = cls()
        index.exact = {path: _ordered(rs) for path, rs in exact.items()}
        index.prefixes = {prefix: _ordered(rs) for prefix, rs in prefixes.items()}
        index.longest_prefix = max(map(len, prefixes), default=0)
        ranked = sorted(regexes.items(), key=lambda item: min(r.index for r in item[1]))
        index.regexes = tuple(
            (_compile(pattern, min(r.index for r in rs)), _ordered(rs)) for pattern, rs in ranked
        )
        index.any_path = _ordered(any_path)
        return index

    def find(self, path: str, method: str, source: HeaderSource) -> _Route[T] | None:
        """The most specific route of this host bucket that accepts the request."""
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
        for pattern, bucket in self.regexes:
            if pattern.fullmatch(path) is not None:
                route = _first(bucket, method, source)
                if route is not None:
                    return route
        if self.any_path:
            return _first(self.any_path, method, source)
        return None

    def _prefix_buckets(self, path: str) -> list[tuple[_Route[T], ...]]:
        """Buckets of the prefixes that match `path` on a segment boundary, longest first.

        A prefix "/a" matches "/a" and "/a/...", and "/a/" matches "/a/...": so the candidates
        are the path itself, then for each "/" from the right the text up to and including it,
        then the text before it.  Prefixes are at most `longest_prefix` long, so slashes beyond
        that are never looked at (the text before a slash at `limit` still fits).
        """
        prefixes = self.prefixes
        limit = self.longest_prefix
        found: list[tuple[_Route[T], ...]] = []
        size = len(path)
        if size <= limit:
            bucket = prefixes.get(path)
            if bucket is not None:
                found.append(bucket)
        slash = path.rfind("/", 0, limit + 1)
        while slash >= 0:
            # when the path ends in "/" and fits, path[: slash + 1] is the path, looked up above
            if slash + 1 < size:
                bucket = prefixes.get(path[: slash + 1])
                if bucket is not None:
                    found.append(bucket)
            if slash:
                bucket = prefixes.get(path[:slash])
                if bucket is not None:
                    found.append(bucket)
            slash = path.rfind("/", 0, slash)
        return found

    def collect_allowed(self, path: str, source: HeaderSource, allowed: set[str]) -> None:
        """Add the methods of routes matching path and headers (the 405 case, off the hot path)."""
        buckets: list[tuple[_Route[T], ...]] = []
        bucket = self.exact.get(path)
        if bucket is not None:
            buckets.append(bucket)
        if self.prefixes:
            buckets.extend(self._prefix_buckets(path))
        buckets.extend(b for pattern, b in self.regexes if pattern.fullmatch(path) is not None)
        buckets.append(self.any_path)
        for routes in buckets:
            for route in routes:
                if route.methods is not None and route.accepts_headers(source):
                    allowed.update(route.methods)


def _compile(pattern: str, index: int) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        # the loader validates regexes; this keeps a bad one a config error, not a crash
        raise ConfigError(f"routes[{index}].match.path_regex", f"invalid regex: {exc}") from exc


def _host_key(host: str) -> str:
    """A Host header value -> lower-case name without port, IPv6 brackets or trailing dot."""
    if ":" in host:
        if host[0] == "[":
            end = host.find("]")
            if end > 0:
                return host[1:end].lower()
        else:
            # partition() is measurably cheaper than slicing at rfind(); a name has one colon
            host = host.partition(":")[0]
    if host and host[-1] == ".":
        host = host[:-1]
    return host.lower()


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

        `host` is the raw Host header value (any case, maybe with a port) or None; `path` is
        normalized; `method` is upper case.
        """
        if self._has_host_routes and host:
            name = _host_key(host)
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
            name = _host_key(host)
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
