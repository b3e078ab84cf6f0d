"""gateway.routing: route selection and precedence (SPEC §2 "Route selection")."""

from __future__ import annotations

import pytest

from gateway.config.model import MatchConfig
from gateway.errors import ConfigError, MethodNotAllowed, NoRoute
from gateway.http.host import normalize_host
from gateway.routing import Router


class Headers:
    """A HeaderSource over a dict of lower-case names."""

    def __init__(self, **values: str) -> None:
        self.values = {name.replace("_", "-"): value for name, value in values.items()}
        self.asked: list[str] = []

    def get_header(self, name: str) -> str | None:
        self.asked.append(name)
        return self.values.get(name)


NO_HEADERS = Headers()


def router(*matches: MatchConfig) -> Router[str]:
    """Routes named r0, r1, ... in file order."""
    return Router.build([(m, i, f"r{i}") for i, m in enumerate(matches)])


def pick(
    r: Router[str],
    path: str,
    *,
    host: str | None = "example.com",
    method: str = "GET",
    headers: Headers = NO_HEADERS,
) -> str:
    """The route for a raw Host value, normalized first as the server protocol does."""
    name = None if host is None else normalize_host(host.encode("latin-1"))[1]
    return r.match(name, path, method, headers)


# -- host ------------------------------------------------------------------------------------


def test_exact_host_beats_wildcard_beats_any_host() -> None:
    r = router(
        MatchConfig(path_prefix="/"),
        MatchConfig(host="*.example.com", path_prefix="/"),
        MatchConfig(host="api.example.com", path_prefix="/"),
    )
    assert pick(r, "/x", host="api.example.com") == "r2"
    assert pick(r, "/x", host="web.example.com") == "r1"
    assert pick(r, "/x", host="other.org") == "r0"
    assert pick(r, "/x", host=None) == "r0"


def test_host_outranks_path_specificity() -> None:
    r = router(
        MatchConfig(path="/users"),
        MatchConfig(host="*.example.com", path_regex="/.*"),
        MatchConfig(host="api.example.com"),
    )
    assert pick(r, "/users", host="api.example.com") == "r2"
    assert pick(r, "/users", host="web.example.com") == "r1"
    assert pick(r, "/users", host="example.org") == "r0"


def test_a_more_specific_host_without_a_matching_path_falls_back() -> None:
    r = router(
        MatchConfig(path_prefix="/"),
        MatchConfig(host="*.example.com", path_prefix="/web"),
        MatchConfig(host="api.example.com", path_prefix="/api"),
    )
    assert pick(r, "/api/x", host="api.example.com") == "r2"
    assert pick(r, "/web/x", host="api.example.com") == "r1"
    assert pick(r, "/other", host="api.example.com") == "r0"


def test_wildcard_matches_subdomains_at_any_depth_but_not_the_apex() -> None:
    r = router(MatchConfig(host="*.example.com"))
    assert pick(r, "/", host="a.example.com") == "r0"
    assert pick(r, "/", host="a.b.c.example.com") == "r0"
    for host in ("example.com", "badexample.com", "example.com.evil.org", "com"):
        with pytest.raises(NoRoute):
            pick(r, "/", host=host)


def test_the_longest_wildcard_suffix_wins() -> None:
    r = router(
        MatchConfig(host="*.example.com"),
        MatchConfig(host="*.eu.example.com"),
    )
    assert pick(r, "/", host="a.eu.example.com") == "r1"
    assert pick(r, "/", host="x.a.eu.example.com") == "r1"
    assert pick(r, "/", host="eu.example.com") == "r0"
    assert pick(r, "/", host="a.us.example.com") == "r0"


@pytest.mark.parametrize(
    "host",
    [
        "api.example.com",
        "API.Example.COM",
        "api.example.com:8080",
        "Api.Example.Com:443",
        "api.example.com.",
        "api.example.com.:80",
    ],
)
def test_host_ignores_case_port_and_trailing_dot(host: str) -> None:
    r = router(MatchConfig(path_prefix="/"), MatchConfig(host="api.example.com"))
    assert pick(r, "/", host=host) == "r1"


def test_wildcard_host_ignores_case_and_port() -> None:
    r = router(MatchConfig(path_prefix="/"), MatchConfig(host="*.example.com"))
    assert pick(r, "/", host="WWW.EXAMPLE.COM:8443") == "r1"
    assert pick(r, "/", host="example.com:8443") == "r0"


@pytest.mark.parametrize("config_host", ["[::1]", "::1"])
@pytest.mark.parametrize("host", ["[::1]", "[::1]:8080"])
def test_ipv6_host(config_host: str, host: str) -> None:
    r = router(MatchConfig(path_prefix="/"), MatchConfig(host=config_host))
    assert pick(r, "/", host=host) == "r1"
    assert pick(r, "/", host="[::2]:8080") == "r0"


def test_ipv4_host_with_port() -> None:
    r = router(MatchConfig(path_prefix="/"), MatchConfig(host="127.0.0.1"))
    assert pick(r, "/", host="127.0.0.1:8080") == "r1"
    assert pick(r, "/", host="127.0.0.2:8080") == "r0"


@pytest.mark.parametrize("host", [None, "", " "])
def test_missing_host_matches_only_any_host_routes(host: str | None) -> None:
    r = router(MatchConfig(host="api.example.com"), MatchConfig(path_prefix="/public"))
    assert pick(r, "/public/x", host=host) == "r1"
    with pytest.raises(NoRoute):
        pick(r, "/private", host=host)


# -- path ------------------------------------------------------------------------------------


def test_exact_path_beats_longest_prefix_beats_regex_beats_no_path() -> None:
    r = router(
        MatchConfig(),
        MatchConfig(path_regex="/api/.*"),
        MatchConfig(path_prefix="/api"),
        MatchConfig(path_prefix="/api/users"),
        MatchConfig(path="/api/users/me"),
    )
    assert pick(r, "/api/users/me") == "r4"
    assert pick(r, "/api/users/42") == "r3"
    assert pick(r, "/api/orders") == "r2"
    assert pick(r, "/apix/") == "r0"
    r_no_prefix = router(MatchConfig(), MatchConfig(path_regex="/api/.*"))
    assert pick(r_no_prefix, "/api/orders") == "r1"
    assert pick(r_no_prefix, "/other") == "r0"


def test_precedence_does_not_depend_on_file_order() -> None:
    r = router(
        MatchConfig(path="/api/users/me"),
        MatchConfig(path_prefix="/api/users"),
        MatchConfig(path_prefix="/api"),
        MatchConfig(path_regex="/api/.*"),
        MatchConfig(),
    )
    assert pick(r, "/api/users/me") == "r0"
    assert pick(r, "/api/users/42") == "r1"
    assert pick(r, "/api/orders") == "r2"
    assert pick(r, "/x") == "r4"


def test_exact_path_is_exact() -> None:
    r = router(MatchConfig(path="/api"))
    assert pick(r, "/api") == "r0"
    for path in ("/api/", "/api/x", "/apix", "/ap"):
        with pytest.raises(NoRoute):
            pick(r, path)


@pytest.mark.parametrize(
    ("path", "matches"),
    [
        ("/api", True),
        ("/api/", True),
        ("/api/x", True),
        ("/api/x/y/z/", True),
        ("/apix", False),
        ("/apix/y", False),
        ("/ap", False),
        ("/", False),
        ("/v1/api", False),
    ],
)
def test_prefix_matches_on_segment_boundaries(path: str, matches: bool) -> None:
    r = router(MatchConfig(path_prefix="/api"))
    if matches:
        assert pick(r, path) == "r0"
    else:
        with pytest.raises(NoRoute):
            pick(r, path)


def test_prefix_with_trailing_slash_requires_the_slash() -> None:
    r = router(MatchConfig(path_prefix="/api/"), MatchConfig(path_prefix="/"))
    assert pick(r, "/api/") == "r0"
    assert pick(r, "/api/x") == "r0"
    assert pick(r, "/api") == "r1"
    assert pick(r, "/apix") == "r1"


def test_root_prefix_matches_everything() -> None:
    r = router(MatchConfig(path_prefix="/"))
    for path in ("/", "/a", "/a/", "/a/b/c/d/e/f/g/h"):
        assert pick(r, path) == "r0"


def test_longest_prefix_wins_whatever_the_depth() -> None:
    r = router(
        MatchConfig(path_prefix="/"),
        MatchConfig(path_prefix="/a"),
        MatchConfig(path_prefix="/a/b/c"),
        MatchConfig(path_prefix="/a/b/"),
        MatchConfig(path_prefix="/a/b"),
    )
    assert pick(r, "/a/b/c/d/e/f/g/h/i/j") == "r2"
    assert pick(r, "/a/b/c") == "r2"
    assert pick(r, "/a/b/cd") == "r3"
    assert pick(r, "/a/b/") == "r3"
    assert pick(r, "/a/b") == "r4"
    assert pick(r, "/a/bc") == "r1"
    assert pick(r, "/a") == "r1"
    assert pick(r, "/ab") == "r0"


def test_a_long_path_beyond_the_longest_prefix_still_finds_it() -> None:
    # the walk starts at the longest configured prefix; the slash right after it must count
    r = router(MatchConfig(path_prefix="/svc4"))
    assert pick(r, "/svc4/users/123/orders/9") == "r0"
    assert pick(r, "/svc4/") == "r0"
    with pytest.raises(NoRoute):
        pick(r, "/svc45/users")


def test_regex_must_match_the_whole_path() -> None:
    r = router(MatchConfig(path_regex="/users/[0-9]+"))
    assert pick(r, "/users/42") == "r0"
    for path in ("/users/42/orders", "/v1/users/42", "/users/"):
        with pytest.raises(NoRoute):
            pick(r, path)


def test_regexes_are_tried_in_file_order() -> None:
    matches = [MatchConfig(path_regex="/a/.*"), MatchConfig(path_regex="/.*/b")]
    assert pick(router(*matches), "/a/b") == "r0"
    # build() ranks by the file index, not by the order of the sequence it is given
    reversed_input = Router.build([(matches[1], 1, "r1"), (matches[0], 0, "r0")])
    assert pick(reversed_input, "/a/b") == "r0"
    assert pick(reversed_input, "/x/b") == "r1"


def test_invalid_regex_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        Router.build([(MatchConfig(path_regex="/a/("), 3, "r3")])
    assert info.value.path == "routes[3].match.path_regex"


# -- headers and file order ------------------------------------------------------------------


def test_route_with_header_match_beats_one_without() -> None:
    r = router(
        MatchConfig(path_prefix="/users"),
        MatchConfig(path_prefix="/users", headers=(("x-canary", "true"),)),
    )
    assert pick(r, "/users/1", headers=Headers(x_canary="true")) == "r1"
    assert pick(r, "/users/1", headers=Headers(x_canary="false")) == "r0"
    assert pick(r, "/users/1") == "r0"


def test_headers_rank_below_path_specificity() -> None:
    r = router(
        MatchConfig(path_prefix="/users", headers=(("x-canary", "true"),)),
        MatchConfig(path="/users/me"),
    )
    assert pick(r, "/users/me", headers=Headers(x_canary="true")) == "r1"


def test_all_header_matchers_must_match_exactly() -> None:
    r = router(MatchConfig(headers=(("x-a", "1"), ("x-b", "two"))))
    assert pick(r, "/", headers=Headers(x_a="1", x_b="two")) == "r0"
    for headers in (Headers(x_a="1"), Headers(x_a="1", x_b="TWO"), Headers(x_b="two")):
        with pytest.raises(NoRoute):
            pick(r, "/", headers=headers)


def test_header_names_are_asked_in_lower_case() -> None:
    r = router(MatchConfig(headers=(("x-tenant", "a"),)))
    headers = Headers(x_tenant="a")
    assert pick(r, "/", headers=headers) == "r0"
    assert headers.asked == ["x-tenant"]


def test_headers_are_not_consulted_for_routes_without_header_matchers() -> None:
    r = router(MatchConfig(path_prefix="/"))
    headers = Headers()
    assert pick(r, "/x", headers=headers) == "r0"
    assert headers.asked == []


def test_identical_matches_are_decided_by_file_order() -> None:
    matches = [MatchConfig(path_prefix="/a"), MatchConfig(path_prefix="/a")]
    assert pick(Router.build([(matches[1], 1, "r1"), (matches[0], 0, "r0")]), "/a") == "r0"
    with_headers = router(
        MatchConfig(path_prefix="/a", headers=(("x", "1"),)),
        MatchConfig(path_prefix="/a", headers=(("y", "1"),)),
    )
    assert pick(with_headers, "/a", headers=Headers(x="1", y="1")) == "r0"
    assert pick(with_headers, "/a", headers=Headers(y="1")) == "r1"


def test_routes_sharing_a_regex_are_ranked_by_headers() -> None:
    r = router(
        MatchConfig(path_regex="/v[0-9]/.*"),
        MatchConfig(path_regex="/v[0-9]/.*", headers=(("x-canary", "true"),)),
    )
    assert pick(r, "/v1/x", headers=Headers(x_canary="true")) == "r1"
    assert pick(r, "/v1/x") == "r0"


# -- methods, 404 and 405 --------------------------------------------------------------------


def test_method_lists_filter_routes() -> None:
    r = router(
        MatchConfig(path_prefix="/users", methods=("GET",)),
        MatchConfig(path_prefix="/users", methods=("POST", "PUT")),
    )
    assert pick(r, "/users", method="GET") == "r0"
    assert pick(r, "/users", method="PUT") == "r1"


def test_a_less_specific_route_accepting_the_method_wins_over_405() -> None:
    r = router(MatchConfig(path_prefix="/"), MatchConfig(path="/users", methods=("GET",)))
    assert pick(r, "/users", method="GET") == "r1"
    assert pick(r, "/users", method="DELETE") == "r0"


def test_head_is_not_implied_by_get() -> None:
    r = router(MatchConfig(path="/x", methods=("GET",)))
    with pytest.raises(MethodNotAllowed):
        pick(r, "/x", method="HEAD")


def test_405_lists_the_union_of_methods_of_routes_matching_all_but_the_method() -> None:
    r = router(
        MatchConfig(path="/users", methods=("GET", "HEAD")),
        MatchConfig(path_prefix="/users", methods=("POST",)),
        MatchConfig(path_regex="/u.*", methods=("PUT",)),
        MatchConfig(host="*.example.com", methods=("PATCH",)),
        MatchConfig(host="example.com", path_prefix="/", methods=("OPTIONS",)),
        # routes that do not match host, path or headers do not count
        MatchConfig(path="/other", methods=("DELETE",)),
        MatchConfig(host="other.org", path_prefix="/", methods=("TRACE",)),
        MatchConfig(path="/users", methods=("CONNECT",), headers=(("x-admin", "1"),)),
    )
    with pytest.raises(MethodNotAllowed) as info:
        pick(r, "/users", host="a.example.com", method="DELETE")
    assert info.value.status == 405
    assert info.value.headers == (("Allow", "GET, HEAD, PATCH, POST, PUT"),)
    with pytest.raises(MethodNotAllowed) as info:
        pick(r, "/users", host="Example.com:80", method="DELETE")
    assert info.value.headers == (("Allow", "GET, HEAD, OPTIONS, POST, PUT"),)
    with pytest.raises(MethodNotAllowed) as info:
        pick(r, "/users", host="x", method="DELETE", headers=Headers(x_admin="1"))
    assert info.value.headers == (("Allow", "CONNECT, GET, HEAD, POST, PUT"),)


def test_405_from_a_deep_prefix() -> None:
    r = router(MatchConfig(path_prefix="/a", methods=("GET",)))
    with pytest.raises(MethodNotAllowed) as info:
        pick(r, "/a/b/c/d", method="POST")
    assert info.value.headers == (("Allow", "GET"),)


def test_404_when_no_route_matches_the_path() -> None:
    r = router(MatchConfig(path_prefix="/users", methods=("GET",)))
    with pytest.raises(NoRoute) as info:
        pick(r, "/orders", method="POST")
    assert info.value.status == 404


def test_empty_router() -> None:
    r: Router[str] = Router.build([])
    assert len(r) == 0
    with pytest.raises(NoRoute):
        pick(r, "/")


def test_len_counts_every_route() -> None:
    r = router(
        MatchConfig(path="/a"),
        MatchConfig(path="/a"),
        MatchConfig(host="h.example.com"),
        MatchConfig(host="*.example.com", path_regex="/.*"),
    )
    assert len(r) == 4


# -- scale -----------------------------------------------------------------------------------


def _large_table(size: int, *, fallback: bool) -> Router[str]:
    routes: list[tuple[MatchConfig, int, str]] = []
    for i in range(size):
        kind = i % 4
        if kind == 0:
            match = MatchConfig(host=f"h{i}.example.com", path_prefix=f"/svc{i}")
        elif kind == 1:
            match = MatchConfig(host=f"*.w{i}.example.com", path_prefix=f"/svc{i}/v1")
        elif kind == 2:
            match = MatchConfig(path=f"/exact{i}/x", methods=("GET",))
        else:
            match = MatchConfig(path_prefix=f"/p{i}/api", methods=("GET", "POST"))
        routes.append((match, i, f"r{i}"))
    if fallback:
        routes.append((MatchConfig(path_prefix="/"), size, "fallback"))
    return Router.build(routes)


def test_ten_thousand_routes_pick_the_right_route() -> None:
    r = _large_table(10_000, fallback=True)
    assert len(r) == 10_001
    assert pick(r, "/svc4/users/1", host="H4.example.com:8080") == "r4"
    assert pick(r, "/svc9996", host="h9996.example.com") == "r9996"
    assert pick(r, "/svc8/x", host="h4.example.com") == "fallback"
    assert pick(r, "/svc45/x", host="h4.example.com") == "fallback"
    assert pick(r, "/svc5/v1/x", host="a.b.w5.example.com") == "r5"
    assert pick(r, "/svc5/v2", host="a.w5.example.com") == "fallback"
    assert pick(r, "/svc9997/v1", host="x.w9997.example.com") == "r9997"
    assert pick(r, "/svc5/v1", host="w5.example.com") == "fallback"
    assert pick(r, "/exact6/x", host="any.org") == "r6"
    assert pick(r, "/exact6/x/", host="any.org") == "fallback"
    assert pick(r, "/p7/api/users/1", host=None, method="POST") == "r7"
    assert pick(r, "/p9999/api", method="GET") == "r9999"
    assert pick(r, "/p9999/apiv2") == "fallback"
    assert pick(r, "/exact6/x", method="POST") == "fallback"
    without_fallback = _large_table(10_000, fallback=False)
    with pytest.raises(MethodNotAllowed) as info:
        pick(without_fallback, "/exact9998/x", method="DELETE")
    assert info.value.headers == (("Allow", "GET"),)
    with pytest.raises(MethodNotAllowed) as info:
        pick(without_fallback, "/p11/api/x", method="PUT")
    assert info.value.headers == (("Allow", "GET, POST"),)
    with pytest.raises(NoRoute):
        pick(without_fallback, "/svc4", host="h8.example.com")


# -- case-insensitive routes ------------------------------------------------------------------


def test_case_insensitive_prefix_exact_and_regex() -> None:
    r = router(
        MatchConfig(path_prefix="/"),
        MatchConfig(path_prefix="/api", case_insensitive=True),
        MatchConfig(path="/Login", case_insensitive=True),
    )
    assert pick(r, "/API/users") == "r1"
    assert pick(r, "/api") == "r1"
    assert pick(r, "/Apix") == "r0"  # still on segment boundaries
    assert pick(r, "/LOGIN") == "r2"
    r = router(
        MatchConfig(path_regex="/v[0-9]+/x", case_insensitive=True),
        MatchConfig(path_regex="/w[0-9]+/x"),
    )
    assert pick(r, "/V2/X") == "r0"
    with pytest.raises(NoRoute):
        pick(r, "/W2/X")


def test_case_sensitive_routes_keep_their_case() -> None:
    r = router(MatchConfig(path_prefix="/"), MatchConfig(path_prefix="/api"))
    assert pick(r, "/api/x") == "r1"
    assert pick(r, "/API/x") == "r0"


def test_longer_prefix_wins_across_case_kinds() -> None:
    r = router(
        MatchConfig(path_prefix="/api", case_insensitive=True),
        MatchConfig(path_prefix="/api/admin"),
        MatchConfig(path_prefix="/API/ADMIN/keys", case_insensitive=True),
    )
    assert pick(r, "/api/admin/x") == "r1"
    assert pick(r, "/API/admin/x") == "r0"  # the sensitive /api/admin does not match /API
    assert pick(r, "/api/Admin/Keys/1") == "r2"


def test_same_prefix_in_both_kinds_goes_by_file_order() -> None:
    r = router(
        MatchConfig(path_prefix="/api", case_insensitive=True),
        MatchConfig(path_prefix="/api"),
    )
    assert pick(r, "/api/x") == "r0"
    r = router(
        MatchConfig(path_prefix="/api"),
        MatchConfig(path_prefix="/api", case_insensitive=True),
    )
    assert pick(r, "/api/x") == "r0"
    assert pick(r, "/API/x") == "r1"


def test_405_counts_case_insensitive_routes() -> None:
    r = router(MatchConfig(path_prefix="/api", methods=("GET",), case_insensitive=True))
    with pytest.raises(MethodNotAllowed) as caught:
        pick(r, "/API/x", method="POST")
    assert dict(caught.value.headers)["Allow"] == "GET"
