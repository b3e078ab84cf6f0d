"""The `redirect` stage (SPEC §5.8): answer with a redirect instead of proxying.

`status` (308; 301, 302, 303, 307 or 308), `scheme` (http | https), `host`, `path` (a template,
`{path}` by default) and `query: keep | drop`.  The Location is

- relative (`/new/x?q`) when neither `scheme` nor `host` is given: the browser stays on the host
  it asked, and the gateway never writes a host at all;
- absolute otherwise: `scheme` (the request's own when only `host` is given) and `host`, which is
  a fixed `host[:port]`, or `{host}` / `{host}:PORT` for the request's Host name — never a host
  from the request unless the operator wrote `{host}` (an open redirect otherwise: `scheme`
  without `host` is refused at load).

In `path`, `{path}` is the request's normalized path less the route's `strip_prefix` (what an
upstream would have received) and `{query}` its query string; a `?` in the template starts the
Location's own query, where `{query}` may stand.  `query: keep` appends the request's query
when the template does not place it.  Every value is encoded by gateway.http.location, so
nothing a client sends can add a host, a header line or a fragment.

A route whose pipeline has a redirect takes no `upstream` (the kind `answers`), and stages after
it would never run, so they are refused at load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, final

from gateway.config.model import StageSpec
from gateway.config.reader import Fields, Reader, as_str, choice
from gateway.config.stages import PipelineCheck
from gateway.errors import BadRequest, ConfigError
from gateway.http.forwarding import upstream_path
from gateway.http.host import normalize_host
from gateway.http.location import host_only, location_path, location_query, with_port
from gateway.http.messages import Response
from gateway.pipeline import Next, RequestContext
from gateway.stages.kind import BuildContext, StageKind

#: the redirect statuses: permanent or not, method kept (307, 308) or turned into GET (301,
#: 302 for most clients, 303 always)
STATUSES: Final = (301, 302, 303, 307, 308)
_PLACEHOLDER: Final = re.compile(r"\{([^{}]*)\}")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True, kw_only=True)
class RedirectConfig:
    status: int = 308
    #: http | https; None: the request's own (with `host`), or a relative Location
    scheme: str | None = None
    #: a fixed `host[:port]` (normalized), `{host}` or `{host}:PORT`; None: relative Location
    host: str | None = None
    #: the Location's path, and after a `?` its own query: `{path}`, `{query}` placeholders
    path: str = "{path}"
    #: keep: the request's query goes on the Location (unless `path` places `{query}`)
    query: str = "keep"


EXAMPLE: Final = """\
status: 301
scheme: https
host: www.example.com
path: "/v2{path}"
query: keep
"""


# -- templates (parsed at load to report errors, and again when the stage is built) -----------


@dataclass(frozen=True, slots=True)
class _PathTemplate:
    """`path` split into the Location's path part and its own query part (None: no `?`), each
    a list of literals and placeholder names (odd positions, as `re.split` leaves them)."""

    path: tuple[str, ...]
    query: tuple[str, ...] | None

    @property
    def places_query(self) -> bool:
        return self.query is not None and "query" in self.query[1::2]


def _literal_error(text: str) -> str | None:
    """Why a literal part of a template cannot stand in a Location as written, if it cannot."""
    for i, c in enumerate(text):
        if not ("\x21" <= c <= "\x7e") or c in "#\\":
            shown = repr(c) if c.isprintable() else f"0x{ord(c):02X}"
            return f"contains {shown}: percent-encode it"
        if c == "%" and not re.fullmatch(r"[0-9A-Fa-f]{2}", text[i + 1 : i + 3]):
            return "contains a '%' that starts no escape (write %25)"
    return None


def parse_path_template(text: str) -> _PathTemplate:
    """`path` as parts; ConfigError (without a path) when it is not a valid template."""
    path_text, question, query_text = text.partition("?")
    if not (path_text.startswith("/") or path_text.startswith("{path}")):
        raise ConfigError("", "must start with / or {path}")
    parts = _split(path_text)
    if "query" in parts[1::2]:
        raise ConfigError("", "{query} belongs after a '?' (in the Location's query)")
    query = _split(query_text) if question else None
    if query is not None:
        if "path" in query[1::2]:
            raise ConfigError("", "{path} belongs before the '?'")
        if "?" in query_text or "#" in query_text:
            raise ConfigError("", "may have one '?' and no '#'")
    for literal in (*parts[0::2], *(query[0::2] if query is not None else ())):
        problem = _literal_error(literal)
        if problem is not None:
            raise ConfigError("", problem)
    return _PathTemplate(parts, query)


def _split(text: str) -> tuple[str, ...]:
    parts = tuple(_PLACEHOLDER.split(text))
    for literal in parts[0::2]:
        if "{" in literal or "}" in literal:
            raise ConfigError("", "a '{' or '}' that is no placeholder ({path} or {query})")
    for name in parts[1::2]:
        if name not in ("path", "query"):
            raise ConfigError("", f"unknown placeholder {{{name}}}; path takes {{path}}, {{query}}")
    return parts


def parse_host(text: str) -> tuple[str | None, int | None]:
    """(a fixed normalized `host[:port]`, None) or (None, the port of `{host}:PORT`, or None
    for `{host}`); ConfigError (without a path) when it is neither."""
    if text.startswith("{host}"):
        rest = text[len("{host}") :]
        if not rest:
            return None, None
        if rest[0] == ":" and rest[1:].isdigit() and 1 <= int(rest[1:]) <= 65535:
            return None, int(rest[1:])
        raise ConfigError("", "must be {host}, {host}:PORT or a fixed host[:port]")
    if "{" in text or "}" in text:
        raise ConfigError("", "must be {host}, {host}:PORT or a fixed host[:port]")
    try:
        forwarded, name = normalize_host(text.encode("ascii"))
    except (BadRequest, UnicodeEncodeError):
        forwarded, name = b"", ""
    # "name:" is a valid Host (an empty port), but never what an operator meant to write
    if not name or forwarded.endswith(b":"):
        raise ConfigError("", f"must be a host name or IP address with an optional port: {text!r}")
    return forwarded.decode("ascii"), None


def _template(value: object, path: str) -> str:
    text = as_str(value, path)
    try:
        parse_path_template(text)
    except ConfigError as exc:
        raise ConfigError(path, exc.message) from None
    return text


def _host(value: object, path: str) -> str:
    text = as_str(value, path)
    try:
        fixed, _ = parse_host(text)
    except ConfigError as exc:
        raise ConfigError(path, exc.message) from None
    return fixed if fixed is not None else text


def _status(value: object, path: str) -> int:
    if isinstance(value, bool) or value not in STATUSES:
        raise ConfigError(path, "must be 301, 302, 303, 307 or 308")
    assert isinstance(value, int)
    return value


def _check(r: Reader, config: RedirectConfig, path: str) -> None:
    if config.scheme is not None and config.host is None:
        r.error(
            f"{path}.host",
            "is required with scheme: a fixed host, or '{host}' to keep the request's own (the"
            " gateway never redirects to a host taken from the request unless told so)",
        )
    if config.query == "drop" and parse_path_template(config.path).places_query:
        r.error(f"{path}.query", "is drop, but path places {query}")


_FIELDS: Final = Fields(
    RedirectConfig,
    {
        "status": _status,
        "scheme": choice("http", "https"),
        "host": _host,
        "path": _template,
        "query": choice("keep", "drop"),
    },
    check=_check,
)


def _check_pipeline(check: PipelineCheck, config: RedirectConfig) -> RedirectConfig:
    for path, _ in check.after:
        check.error(f"never runs: the redirect at {check.path} answers every request", path)
    return config


# -- the stage ---------------------------------------------------------------------------------


def _expand(parts: tuple[str, ...], values: dict[str, str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return "".join(values[part] if i % 2 else part for i, part in enumerate(parts))


@final
class RedirectStage:
    __slots__ = (
        "_fixed_host",
        "_host_port",
        "_keep_query",
        "_no_host",
        "_redirected",
        "_scheme",
        "_status",
        "_template",
        "_uses_request_host",
    )

    def __init__(self, config: RedirectConfig, spec: StageSpec, env: BuildContext) -> None:
        self._status = config.status
        self._scheme = config.scheme
        self._template = parse_path_template(config.path)
        self._keep_query = config.query == "keep" and not self._template.places_query
        fixed: str | None = None
        port: int | None = None
        if config.host is not None:
            fixed, port = parse_host(config.host)
        self._fixed_host = fixed
        self._host_port = port
        self._uses_request_host = config.host is not None and fixed is None
        counts = env.metrics.stage_total
        self._redirected = counts.labels(spec.label, "redirect", "redirected")
        self._no_host = counts.labels(spec.label, "redirect", "no_host")

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Response:
        head = ctx.head
        template = self._template
        # what an upstream would have received: the route's strip_prefix applies
        routed = upstream_path(head.path, ctx.route.config.strip_prefix)
        path = location_path(_expand(template.path, {"path": routed}))
        query = ""
        if template.query is not None:
            query = _expand(template.query, {"query": head.query}).strip("&")
        if self._keep_query and head.query:
            query = f"{query}&{head.query}" if query else head.query
        location = f"{path}?{location_query(query)}" if query else path
        authority = self._fixed_host
        if self._uses_request_host:
            host = head.host
            if not host:
                self._no_host.inc()
                ctx.outcome("redirect", "no_host")
                raise BadRequest("the request has no Host to redirect to")
            scheme = self._scheme or ctx.peer.scheme
            authority = with_port(host_only(host), self._host_port, _DEFAULT_PORTS[scheme])
        if authority is not None:
            location = f"{self._scheme or ctx.peer.scheme}://{authority}{location}"
        self._redirected.inc()
        ctx.outcome("redirect", "redirected")
        return Response(self._status, [(b"Location", location.encode("ascii"))])


def build(config: RedirectConfig, spec: StageSpec, env: BuildContext) -> RedirectStage:
    return RedirectStage(config, spec, env)


def _describe(config: RedirectConfig) -> dict[str, object]:
    return {
        "status": config.status,
        "scheme": config.scheme,
        "host": config.host,
        "path": config.path,
        "query": config.query,
    }


KIND: Final[StageKind[RedirectConfig, RedirectStage]] = StageKind(
    name="redirect",
    parse=_FIELDS.parse,
    build=build,
    example=EXAMPLE,
    check=_check_pipeline,
    describe=_describe,
    answers=True,
)
