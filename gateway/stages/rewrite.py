"""The `rewrite` stage (SPEC §5.8): the upstream's Host and path.

`host: client` (the default: the client's Host, as without the stage — Kong's `preserve_host`,
APISIX's `pass_host: pass`), `endpoint` (the chosen endpoint's `host[:port]` as its URL spells
it — APISIX's `pass_host: node`, Envoy's `auto_host_rewrite` — which only the proxy knows, per
try, once the balancer picked one) or a fixed `host[:port]` (Envoy's `host_rewrite_literal`,
APISIX's `upstream_host`).  X-Forwarded-Host and Forwarded keep naming the client's host.

`path: {regex, replace}`: Python `re` on the normalized path the route matched (the query is not
part of it and is kept as received).  Every non-overlapping match is replaced, as `re.sub`,
Envoy's `regex_rewrite` and Traefik's `ReplacePathRegex` do; anchor it (`^…$`) to rewrite the
whole path.  `replace` refers to groups as `\\1` or `\\g<1>` / `\\g<name>`; it is checked at
load against the regex's groups, and a literal part must be something a path may hold.  A path
the regex does not match goes on as routed.  The result is a new path, so it is held to what a
client's path is: normalized again by the gateway's own code (gateway.http.path), and refused with
500 `rewrite_invalid` — logged and counted — when it is not an origin-form path, when it holds a
dot segment (the normalized path has none, so one can only come from a capture that split a
segment: resolving it would let a client steer the upstream path; `..` above the root is refused
anyway), `%2F`, `%5C`, NUL, an invalid escape, a `?` or `#`, or a spelling the route's `http`
rules refuse.  `strip_prefix` on the same route is refused at load (two rewrites of one path).

The regex is the operator's, not the client's, but it runs on the client's path, and `re` has no
timeout: a pattern with nested quantifiers (`(a+)+$`) can take exponential time on a crafted
path of a few dozen characters.  Keep patterns anchored and unambiguous, or use atomic groups
and possessive quantifiers (`(?>…)`, `a++`, Python 3.11).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Final, final

from gateway.config.model import StageSpec
from gateway.config.reader import Fields, Nested, Reader, as_str
from gateway.config.stages import PipelineCheck
from gateway.errors import BadRequest, ConfigError, RewriteInvalid
from gateway.http.host import normalize_host
from gateway.http.messages import Response
from gateway.http.path import PATH_SEMICOLON, split_target
from gateway.observability.access_log import loggable_path
from gateway.pipeline import Next, RequestContext, UpstreamRewrite
from gateway.stages.kind import BuildContext, StageKind

log = logging.getLogger("gateway.rewrite")

#: `\N` (one or two digits) or `\g<N>` / `\g<name>` in `replace`
_GROUP: Final = re.compile(r"\\(?:([1-9][0-9]?)|g<([^<>]*)>)")
#: a group reference as `compile_replace` writes it (literals hold no backslash)
_CANONICAL: Final = re.compile(r"\\g<([0-9]+)>")
#: a segment `_remove_dot_segments` would resolve, as written or percent-encoded ("%2E" is
#: decoded to "." before dot segments are resolved)
_DOT_SEGMENTS: Final = frozenset({".", "..", "%2e", "%2e%2e", ".%2e", "%2e."})


@dataclass(frozen=True, slots=True, kw_only=True)
class PathRewrite:
    regex: str
    #: as written in the config (`\1`, `\g<name>`)
    replace: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RewriteConfig:
    #: client | endpoint | a fixed host[:port] (normalized)
    host: str = "client"
    path: PathRewrite | None = None


EXAMPLE: Final = """\
host: endpoint
path: {regex: '^/api/v1/(.*)$', replace: '/v1/\\1'}
"""


# -- parsing ------------------------------------------------------------------------------------


def compile_replace(pattern: re.Pattern[str], replace: str) -> str:
    """`replace` as an unambiguous `re` template (every reference `\\g<N>`); ConfigError
    (without a path) when it names a group the regex does not have, or a literal part holds
    what a path cannot."""
    out: list[str] = []
    at = 0
    for m in _GROUP.finditer(replace):
        out.append(_literal(replace[at : m.start()]))
        number, name = m.group(1), m.group(2)
        if number is not None:
            index = int(number)
            if index > pattern.groups:
                raise ConfigError("", f"\\{index}: the regex has {pattern.groups} group(s)")
        elif name is not None and name.isdigit():
            index = int(name)
            if not 0 <= index <= pattern.groups:
                raise ConfigError("", f"\\g<{name}>: the regex has {pattern.groups} group(s)")
        else:
            if name not in pattern.groupindex:
                known = ", ".join(pattern.groupindex) or "none"
                raise ConfigError("", f"\\g<{name}>: no such named group (named: {known})")
            index = pattern.groupindex[name]
        out.append(f"\\g<{index}>")
        at = m.end()
    out.append(_literal(replace[at:]))
    return "".join(out)


def replace_parts(template: str) -> tuple[list[str], list[int]]:
    """A template from `compile_replace` as its literal parts and the group numbers between
    them (one literal more than groups): what `RewriteStage` expands itself, since `re`'s own
    template expansion is interpreted Python on every match."""
    parts = _CANONICAL.split(template)
    return parts[0::2], [int(n) for n in parts[1::2]]


def _literal(text: str) -> str:
    """A literal part of `replace`, checked for what a normalized path may hold."""
    for i, c in enumerate(text):
        if c == "\\":
            raise ConfigError(
                "", "a '\\' starts a group reference (\\1, \\g<1>, \\g<name>); a path has none"
            )
        if not ("\x21" <= c <= "\x7e") or c in "?#":
            shown = repr(c) if c.isprintable() else f"0x{ord(c):02X}"
            raise ConfigError("", f"contains {shown}, which a path cannot (the query is kept)")
        if c == "%":
            escape = text[i + 1 : i + 3].upper()
            if not re.fullmatch(r"[0-9A-F]{2}", escape):
                raise ConfigError("", "contains a '%' that starts no escape (write %25)")
            if escape in ("2F", "5C", "00"):
                raise ConfigError("", f"contains %{escape}, which paths never carry")
    return text


def _path(r: Reader, raw: object, path: str) -> PathRewrite | None:
    m = r.mapping(raw, path, {"regex", "replace"}, required=("regex", "replace"))
    if m is None or "regex" not in m or "replace" not in m:
        return None
    regex = r.get(m, "regex", path, as_str, "")
    replace = r.get(m, "replace", path, as_str, "")
    if not regex:
        if "regex" in m and isinstance(m["regex"], str):
            r.error(f"{path}.regex", "must not be empty (it would match everywhere)")
        return None
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        r.error(f"{path}.regex", f"invalid regular expression: {exc}")
        return None
    try:
        compile_replace(pattern, replace)
    except ConfigError as exc:
        r.error(f"{path}.replace", exc.message)
        return None
    return PathRewrite(regex=regex, replace=replace)


def _host(value: object, path: str) -> str:
    text = as_str(value, path)
    if text in ("client", "endpoint"):
        return text
    try:
        forwarded, name = normalize_host(text.encode("ascii"))
    except (BadRequest, UnicodeEncodeError):
        forwarded, name = b"", ""
    # "name:" is a valid Host (an empty port), but never what an operator meant to write
    if not name or forwarded.endswith(b":"):
        raise ConfigError(
            path, f"must be client, endpoint or a host name or IP address[:port], not {text!r}"
        )
    return forwarded.decode("ascii")


_FIELDS: Final = Fields(RewriteConfig, {"host": _host, "path": Nested(_path)})
_NOTHING: Final = "rewrites nothing: give host (endpoint or a fixed one) or path"


def parse(r: Reader, raw: object, path: str) -> RewriteConfig | None:
    if raw is None or raw == {}:
        r.error(path, _NOTHING)
        return None
    config = _FIELDS.parse(r, raw, path)
    if config is not None and config.host == "client" and config.path is None:
        r.error(path, _NOTHING)
        return None
    return config


def _check_pipeline(check: PipelineCheck, config: RewriteConfig) -> RewriteConfig:
    if "rewrite" in check.kinds_before:
        check.error("a route has one rewrite stage (there is one before this one)")
    if config.path is not None and check.strip_prefix not in (None, "/"):
        check.error(
            f"rewrites the path, and so does the route's strip_prefix ({check.strip_prefix}):"
            " use one (the regex can strip the prefix)"
        )
    return config


# -- the stage ----------------------------------------------------------------------------------


def rewritten_path(path: str, refused_flags: int) -> str:
    """A rewrite's output, held to what a client's path is and normalized; RewriteInvalid (with
    the reason) when the gateway would have refused it from a client, or it holds a dot
    segment."""
    if not path.startswith("/"):
        raise RewriteInvalid("the rewritten path does not start with '/'")
    if "?" in path or "#" in path:
        raise RewriteInvalid("the rewritten path contains '?' or '#'")
    if "." in path or "%2" in path:  # most paths have neither: no split, no lower-casing
        for segment in path.split("/"):
            if segment.lower() in _DOT_SEGMENTS:
                raise RewriteInvalid("the rewritten path contains a dot segment")
    try:
        normalized, _, _, flags = split_target(path.encode("ascii"))
    except UnicodeEncodeError:
        raise RewriteInvalid("the rewritten path is not ASCII") from None
    except BadRequest as exc:
        raise RewriteInvalid(f"the rewritten path is refused: {exc.detail}") from None
    if flags & refused_flags:
        what = "';'" if flags & refused_flags & PATH_SEMICOLON else "an ambiguous escape"
        raise RewriteInvalid(f"the rewritten path contains {what} (the route's http rules)")
    return normalized


@final
class RewriteStage:
    __slots__ = (
        "_endpoint_host",
        "_fixed",
        "_groups",
        "_host",
        "_invalid",
        "_literals",
        "_name",
        "_pattern",
        "_rewritten",
        "_unmatched",
    )

    def __init__(self, config: RewriteConfig, spec: StageSpec, env: BuildContext) -> None:
        self._name = spec.label
        self._endpoint_host = config.host == "endpoint"
        host = None if config.host in ("client", "endpoint") else config.host.encode("ascii")
        self._host = host
        #: what a request whose path is not rewritten carries: one value for every request
        self._fixed = (
            UpstreamRewrite(None, host, endpoint_host=self._endpoint_host)
            if host is not None or self._endpoint_host
            else None
        )
        self._pattern: re.Pattern[str] | None = None
        self._literals: list[str] = []
        self._groups: list[int] = []
        if config.path is not None:
            self._pattern = re.compile(config.path.regex)
            template = compile_replace(self._pattern, config.path.replace)
            self._literals, self._groups = replace_parts(template)
        counts = env.metrics.stage_total
        self._rewritten = counts.labels(spec.label, "rewrite", "rewritten")
        self._unmatched = counts.labels(spec.label, "rewrite", "unmatched")
        self._invalid = counts.labels(spec.label, "rewrite", "invalid")

    def __call__(self, ctx: RequestContext, call_next: Next) -> Awaitable[Response]:
        # nothing to do on the way out: the rest of the pipeline is returned, not awaited here
        pattern = self._pattern
        if pattern is None:
            ctx.rewrite = self._fixed
            self._rewritten.inc()
            ctx.outcome("rewrite", "rewritten")
            return call_next(ctx)
        head = ctx.head
        path, count = pattern.subn(self._expand, head.path)
        if not count:
            ctx.rewrite = self._fixed
            self._unmatched.inc()
            ctx.outcome("rewrite", "unmatched")
            return call_next(ctx)
        try:
            path = rewritten_path(path, ctx.route.refused_path_flags)
        except RewriteInvalid as exc:
            self._invalid.inc()
            ctx.outcome("rewrite", "invalid")
            log.warning(
                "rewrite refused: %s",
                exc.detail,
                extra={
                    "stage": self._name,
                    "route": ctx.route.name,
                    "request_id": ctx.request_id.decode("latin-1"),
                    "path": loggable_path(head.path),
                    "rewritten": loggable_path(path),
                },
            )
            raise
        ctx.rewrite = UpstreamRewrite(path, self._host, endpoint_host=self._endpoint_host)
        self._rewritten.inc()
        ctx.outcome("rewrite", "rewritten")
        return call_next(ctx)


    def _expand(self, match: re.Match[str]) -> str:
        """`replace` for one match (a group that did not take part is empty, as in `re.sub`)."""
        literals = self._literals
        out = [literals[0]]
        for i, group in enumerate(self._groups):
            out.append(match.group(group) or "")
            out.append(literals[i + 1])
        return "".join(out)


def build(config: RewriteConfig, spec: StageSpec, env: BuildContext) -> RewriteStage:
    return RewriteStage(config, spec, env)


def _describe(config: RewriteConfig) -> dict[str, object]:
    described: dict[str, object] = {"host": config.host}
    if config.path is not None:
        described["path"] = {"regex": config.path.regex, "replace": config.path.replace}
    return described


KIND: Final[StageKind[RewriteConfig, RewriteStage]] = StageKind(
    name="rewrite",
    parse=parse,
    build=build,
    example=EXAMPLE,
    check=_check_pipeline,
    describe=_describe,
)
