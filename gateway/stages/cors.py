"""The `cors` stage (SPEC §5.8): cross-origin resource sharing answered by the gateway.

- A preflight — `OPTIONS` with `Origin` and `Access-Control-Request-Method` — is answered here,
  204, and never reaches the stages after this one or the upstream.  When the origin, the method
  and every requested header are allowed, the 204 carries `Access-Control-Allow-Origin` and the
  rest; otherwise it carries no CORS header at all, which every browser takes as a refusal (a
  403 would be refused the same, and say no more: the gateway answers like Traefik and Kong).
- Any other request goes on.  Its response (a gateway error from a later stage included, so a
  script can read a 401 or a 429) gets `Access-Control-Allow-Origin` — the request's origin,
  lower-cased, never anything the configured list does not match — and
  `Access-Control-Allow-Credentials` / `-Expose-Headers` when the origin is allowed, nothing
  when it is not.
- The gateway owns CORS on its routes: `Access-Control-*` headers from the upstream are always
  dropped, so an upstream that reflects any origin cannot widen the configured list, and a
  browser never sees two `Access-Control-Allow-Origin` values.
- Every response carries `Vary: Origin` (merged into the upstream's `Vary`) unless the list is
  `*`, whose answer is the same for every request: `Access-Control-Allow-Origin: *` on every
  response, Origin or not, so a shared cache may serve it to anyone.

Origins are compared exactly after lower-casing (ASCII only; browsers send them lower-case):
scheme, host and port.  A pattern `https://*.example.com` matches one or more DNS labels in front
of `.example.com` — never the apex, another scheme or port, or anything with a path, query,
user or port smuggled into the host part.  `null` matches only when listed.  A request with
several `Origin` headers is not a browser's, and none of them is allowed.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, final

from gateway.config.model import StageSpec
from gateway.config.reader import Fields, Reader, as_bool, as_str
from gateway.config.stages import PipelineCheck
from gateway.config.units import parse_duration
from gateway.errors import ConfigError, GatewayError
from gateway.http.messages import Response
from gateway.observability.instruments import Counter
from gateway.pipeline import Next, RequestContext, ResponseEdit
from gateway.stages.converters import TOKEN
from gateway.stages.kind import BuildContext, StageKind
from gateway.stages.outcomes import StageOutcomes

#: methods a browser never asks a preflight about (CORS-safelisted): always allowed
SAFELISTED_METHODS: Final = ("GET", "HEAD", "POST")
#: ports browsers leave out of an origin: written in the config, they are dropped
_DEFAULT_PORTS: Final = {"http": "80", "https": "443"}
_SCHEME: Final = re.compile(r"[a-z][a-z0-9+.-]*")
#: a DNS name as browsers put it in an origin (IDNs as punycode); `_` occurs in real host names
_HOST: Final = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
#: what a wildcard stands for in a request's origin: one or more labels, nothing else
_LABELS: Final = re.compile(rb"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")


@dataclass(frozen=True, slots=True, kw_only=True)
class CorsConfig:
    #: normalized (lower case, no default port): `*` alone, `null`, exact origins and
    #: `scheme://*.domain[:port]` patterns
    allow_origins: tuple[str, ...]
    #: upper case; GET, HEAD and POST are allowed whatever this says (browsers never ask)
    allow_methods: tuple[str, ...] = SAFELISTED_METHODS
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    allow_credentials: bool = False
    #: seconds browsers may cache a preflight's answer (sent in whole seconds)
    max_age: float = 600.0


EXAMPLE: Final = """\
allow_origins: ["https://app.example.com", "https://*.example.com"]
allow_methods: [GET, POST, PUT, DELETE]
allow_headers: [Authorization, Content-Type]
expose_headers: [X-Request-Id]
allow_credentials: true
max_age: 10m
"""


def normalize_origin(text: str, path: str) -> str:
    """An allowed origin as browsers serialize one, or ConfigError saying what is wrong."""
    if text == "*":
        return text
    low = text.lower()
    if low == "null":
        return low
    if not text.isascii():
        raise ConfigError(path, f"{text!r}: write an international domain in its xn-- form")
    scheme, sep, rest = low.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        raise ConfigError(path, f"{text!r} must be scheme://host[:port], e.g. https://example.com")
    if any(c in rest for c in "/?#"):
        raise ConfigError(
            path, f"{text!r}: an origin has no path, query or fragment (not even a trailing /)"
        )
    if "@" in rest:
        raise ConfigError(path, f"{text!r}: an origin has no user name")
    if rest.startswith("["):
        host, bracket, port = rest.partition("]")
        host += bracket
        if not bracket or (port and not port.startswith(":")):
            raise ConfigError(path, f"{text!r}: an IPv6 host is written [address]")
        port = port[1:]
        try:
            socket.inet_pton(socket.AF_INET6, host[1:-1])
        except (OSError, ValueError):
            raise ConfigError(path, f"{text!r}: {host} is not an IPv6 address") from None
    else:
        host, colon, port = rest.partition(":")
        if colon and not port:
            raise ConfigError(path, f"{text!r}: the port is missing after ':'")
        wildcard = host.startswith("*.")
        name = host[2:] if wildcard else host
        if "*" in name:
            raise ConfigError(
                path,
                f"{text!r}: a wildcard is only scheme://*.domain, standing for one or more"
                " labels of a subdomain",
            )
        if not _HOST.fullmatch(name):
            raise ConfigError(path, f"{text!r}: {name!r} is not a host name")
        if wildcard and name.count(".") < 1:
            raise ConfigError(
                path, f"{text!r}: a wildcard needs a domain of two labels or more under it"
            )
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(path, f"{text!r}: the port must be 1 to 65535")
        port = str(int(port))
        if _DEFAULT_PORTS.get(scheme) == port:
            port = ""
    return f"{scheme}://{host}" + (f":{port}" if port else "")


def _origins(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, 'must be a non-empty list of origins, e.g. ["https://example.com"]')
    result: list[str] = []
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        origin = normalize_origin(as_str(item, where), where)
        if origin not in result:
            result.append(origin)
    if "*" in result and len(result) > 1:
        raise ConfigError(path, "* allows every origin: list it alone, or list origins")
    return tuple(result)


def _tokens(what: str, upper: bool) -> Callable[[object, str], tuple[str, ...]]:
    def convert(value: object, path: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list of {what}s")
        result: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not TOKEN.fullmatch(item):
                raise ConfigError(f"{path}[{i}]", f"must be a {what} (or *)")
            name = item.upper() if upper else item
            if name.lower() not in (n.lower() for n in result):
                result.append(name)
        return tuple(result)

    return convert


def _max_age(value: object, path: str) -> float:
    seconds = parse_duration(value, path)
    if seconds < 1 and seconds != 0:
        raise ConfigError(path, "is sent in whole seconds: 0 (no caching) or at least 1s")
    return seconds


def _check_fields(r: Reader, config: CorsConfig, path: str) -> None:
    if not config.allow_credentials:
        return
    # with credentials, browsers read * as a literal name, and refuse it as an origin
    for key in ("allow_origins", "allow_methods", "allow_headers", "expose_headers"):
        if "*" in getattr(config, key):
            r.error(
                f"{path}.{key}",
                "* cannot be combined with allow_credentials: true (browsers refuse it or read"
                " it literally): list the values",
            )


_FIELDS: Final = Fields(
    CorsConfig,
    {
        "allow_origins": _origins,
        "allow_methods": _tokens("method", upper=True),
        "allow_headers": _tokens("header name", upper=False),
        "expose_headers": _tokens("header name", upper=False),
        "allow_credentials": as_bool,
        "max_age": _max_age,
    },
    required=("allow_origins",),
    check=_check_fields,
)


def parse(r: Reader, raw: object, path: str) -> CorsConfig | None:
    m = _FIELDS.mapping(r, raw, path)
    if m is None:
        return None
    errors = len(r.errors)
    # an invalid allow_origins (reported) stands as none, so the other fields are still checked
    return _FIELDS.create(r, _FIELDS.values(r, m, path, allow_origins=()), path, errors)


#: stages that refuse a request without credentials: a preflight never has any
_AUTHENTICATING: Final = ("jwt", "api_key", "basic_auth")


def _check(check: PipelineCheck, config: CorsConfig) -> CorsConfig:
    before = check.kinds_before
    if "cors" in before:
        check.error("a route has one cors stage: merge the two")
    for kind in _AUTHENTICATING:
        if kind in before:
            check.error(
                f"cors must come before {kind}: browsers send preflights without credentials,"
                f" so {kind} would refuse them all, and its 401s would reach scripts without"
                " CORS headers"
            )
            break
    return config


def _describe(config: CorsConfig) -> dict[str, Any]:
    return {"allow_origins": list(config.allow_origins)}


#: the metrics' outcomes (gateway_stage_total{stage="cors"}), for requests with an Origin
PREFLIGHT: Final = "preflight"
PREFLIGHT_REJECTED: Final = "preflight_rejected"
ALLOWED: Final = "allowed"
REJECTED: Final = "rejected"

_ALLOW_ORIGIN: Final = b"Access-Control-Allow-Origin"
_PREFIX: Final = b"access-control-"
_VARY_ORIGIN: Final = (b"Vary", b"Origin")


def _names_origin(vary: bytes) -> bool:
    """Whether a Vary value already covers Origin (`*` covers every header)."""
    for item in vary.split(b","):
        name = item.strip().lower()
        if name == b"origin" or name == b"*":
            return True
    return False


def _is_cors_header(name: bytes) -> bool:
    return len(name) > 15 and name[:15].lower() == _PREFIX


async def _answered(response: Response) -> Response:
    return response


@final
class CorsEdit(ResponseEdit):
    """What an allowed request's response gets (`allowed` is its Access-Control-Allow-Origin
    value; None for a refused origin or none: Vary alone), on the way back through the stage
    or from the connection (pipeline.ResponseEdit)."""

    __slots__ = ("_actual", "_allowed", "_vary")

    def __init__(
        self, allowed: bytes | None, vary: bool, actual: list[tuple[bytes, bytes]]
    ) -> None:
        self._allowed = allowed
        self._vary = vary
        #: what follows Access-Control-Allow-Origin (credentials, exposed headers)
        self._actual = actual

    def refused(self, error: GatewayError) -> None:
        extra = []
        allowed = self._allowed
        if allowed is not None:
            extra.append(("Access-Control-Allow-Origin", allowed.decode("ascii")))
            extra += [(n.decode("ascii"), v.decode("ascii")) for n, v in self._actual]
        if self._vary:
            extra.append(("Vary", "Origin"))
        error.headers = (*error.headers, *extra)

    def edited(self, response: Response) -> Response:
        """The upstream's response with its CORS headers replaced by ours, and Origin in
        Vary."""
        headers = response.headers
        vary_at = -1
        covered = not self._vary
        upstream_cors = False
        for i, (name, value) in enumerate(headers):
            size = len(name)
            if size == 4:
                # the first letter before a lower-case copy: Date is four letters too
                if name[0] | 0x20 == 0x76 and name.lower() == b"vary":
                    if vary_at < 0:
                        vary_at = i
                    if not covered and _names_origin(value):
                        covered = True
            elif size > 15 and name[:15].lower() == _PREFIX:
                upstream_cors = True
        if not covered and vary_at >= 0:
            # merged into the upstream's first Vary line: some caches read only one
            name, value = headers[vary_at]
            value = value.strip(b" \t")
            headers[vary_at] = (name, value + b", Origin" if value else b"Origin")
            covered = True
        if upstream_cors:
            headers = [(n, v) for n, v in headers if not _is_cors_header(n)]
        allowed = self._allowed
        if allowed is not None:
            headers.append((_ALLOW_ORIGIN, allowed))
            headers.extend(self._actual)
        if not covered:
            headers.append(_VARY_ORIGIN)
        response.headers = headers
        return response


@final
class CorsStage:
    __slots__ = (
        "_actual",
        "_any_header",
        "_any_method",
        "_any_origin",
        "_exact",
        "_headers",
        "_methods",
        "_only",
        "_only_edit",
        "_origin_free",
        "_outcomes",
        "_patterns",
        "_preflight",
        "_vary",
    )

    def __init__(self, config: CorsConfig, total: Counter) -> None:
        origins = config.allow_origins
        self._any_origin = origins == ("*",)
        #: a response depends on the request's Origin unless the answer is * for everyone
        self._vary = not self._any_origin
        self._exact = frozenset(o.encode("ascii") for o in origins if "*" not in o)
        #: the one exact origin when there is one (a web app's own): compared, not hashed
        self._only: bytes | None = next(iter(self._exact)) if len(self._exact) == 1 else None
        #: (b"scheme://", b".domain[:port]") of each wildcard pattern
        patterns: list[tuple[bytes, bytes]] = []
        for origin in origins:
            if "://*." in origin:
                scheme, _, rest = origin.partition("://*")
                patterns.append((f"{scheme}://".encode("ascii"), rest.encode("ascii")))
        self._patterns = tuple(patterns)
        methods = (*SAFELISTED_METHODS, *config.allow_methods)
        self._methods = frozenset(m.encode("ascii") for m in methods)
        self._any_method = "*" in config.allow_methods
        self._headers = frozenset(h.lower().encode("ascii") for h in config.allow_headers)
        self._any_header = "*" in config.allow_headers
        actual: list[tuple[bytes, bytes]] = []
        if config.allow_credentials:
            actual.append((b"Access-Control-Allow-Credentials", b"true"))
        if config.expose_headers:
            actual.append(
                (b"Access-Control-Expose-Headers", ", ".join(config.expose_headers).encode())
            )
        #: what follows Access-Control-Allow-Origin on an allowed request's response
        self._actual = actual
        preflight: list[tuple[bytes, bytes]] = []
        if config.allow_credentials:
            preflight.append((b"Access-Control-Allow-Credentials", b"true"))
        preflight.append(
            (b"Access-Control-Allow-Methods", ", ".join(config.allow_methods).encode())
        )
        if config.allow_headers:
            preflight.append(
                (b"Access-Control-Allow-Headers", ", ".join(config.allow_headers).encode())
            )
        preflight.append((b"Access-Control-Max-Age", b"%d" % int(config.max_age)))
        if self._vary:
            preflight.append(_VARY_ORIGIN)
        #: what follows Access-Control-Allow-Origin on an allowed preflight's 204
        self._preflight = preflight
        self._outcomes = StageOutcomes(total, "cors")
        # the edits most requests get, made once: one whose answer names no origin of the
        # request (`*` for everyone; else none sent or a refused one: Vary alone), and the one
        # listed origin's
        self._origin_free = CorsEdit(b"*" if self._any_origin else None, self._vary, actual)
        self._only_edit = CorsEdit(self._only, self._vary, actual)

    # -- decisions ------------------------------------------------------------------------------

    def allowed_origin(self, origin: bytes) -> bytes | None:
        """The Access-Control-Allow-Origin value for a request's Origin, or None when the
        origin is not allowed."""
        if self._any_origin:
            return b"*"
        only = self._only
        if (only is not None and origin == only) or origin in self._exact:
            # as browsers serialize an origin (lower case, no spaces): no copies to make
            return origin
        low = origin.strip(b" \t").lower()
        if low in self._exact:
            return low
        for scheme, suffix in self._patterns:
            if (
                low.startswith(scheme)
                and low.endswith(suffix)
                and len(low) > len(scheme) + len(suffix)
                and _LABELS.fullmatch(low, len(scheme), len(low) - len(suffix)) is not None
            ):
                return low
        return None

    def allows_request(self, method: bytes, requested_headers: list[bytes]) -> bool:
        """Whether a preflight's Access-Control-Request-Method and -Headers are allowed; like
        browsers, `*` covers every header but Authorization, which must be listed."""
        if not (self._any_method or method in self._methods):
            return False
        allowed = self._headers
        for value in requested_headers:
            for item in value.split(b","):
                name = item.strip(b" \t").lower()
                if not name or name in allowed:
                    continue
                if not self._any_header or name == b"authorization":
                    return False
        return True

    # -- the request ----------------------------------------------------------------------------

    def _count(self, ctx: RequestContext, outcome: str) -> None:
        self._outcomes.count(ctx.route.name, outcome)
        ctx.outcome("cors", outcome)

    def _decide(self, ctx: RequestContext) -> Response | CorsEdit:
        """The preflight's answer, or what the response is to get."""
        head = ctx.head
        origin: bytes | None = None
        several = False
        for name, value in head.headers:
            # the first letter before a lower-case copy: Accept is six letters too
            if len(name) == 6 and name[0] | 0x20 == 0x6F and name.lower() == b"origin":
                several = origin is not None
                origin = value
                if several:
                    break
        if origin is not None:
            if head.method == "OPTIONS":
                preflight = self._preflight_answer(ctx, origin, several)
                if preflight is not None:
                    return preflight
            # a browser sends one Origin: with several, none is believed (but * is for everyone)
            allowed = None if several and not self._any_origin else self.allowed_origin(origin)
            if allowed is None:
                self._count(ctx, REJECTED)
                return self._origin_free
            self._count(ctx, ALLOWED)
            if self._any_origin:
                return self._origin_free  # `*`, whatever the origin
            if allowed == self._only:
                return self._only_edit
            return CorsEdit(allowed, self._vary, self._actual)
        return self._origin_free

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Response:
        edit = self._decide(ctx)
        if isinstance(edit, Response):
            return edit
        try:
            response = await call_next(ctx)
        except GatewayError as exc:
            # a later stage's refusal (401, 429 …) must be readable by the script that caused it
            edit.refused(exc)
            raise
        return edit.edited(response)

    def outermost(self, ctx: RequestContext, call_next: Next) -> Awaitable[Response]:
        """`__call__` when this stage is its route's first (pipeline.compose): the same
        answers, with the response's edit left to the connection (`ctx.edit`) — nothing is
        outside this stage to see the response first — and no coroutine frame of its own."""
        edit = self._decide(ctx)
        if isinstance(edit, Response):
            return _answered(edit)
        ctx.edit = edit
        return call_next(ctx)

    def _preflight_answer(
        self, ctx: RequestContext, origin: bytes, several: bool
    ) -> Response | None:
        """The 204 for a preflight; None when the OPTIONS request is not one (no
        Access-Control-Request-Method), and goes on like any request."""
        method: bytes | None = None
        methods = 0
        requested: list[bytes] = []
        for name, value in ctx.head.headers:
            size = len(name)
            if size == 29 and name.lower() == b"access-control-request-method":
                method = value.strip(b" \t")
                methods += 1
            elif size == 30 and name.lower() == b"access-control-request-headers":
                requested.append(value)
        if method is None:
            return None
        refused = methods > 1 or (several and not self._any_origin)
        allowed = None if refused else self.allowed_origin(origin)
        if allowed is None or not self.allows_request(method, requested):
            self._count(ctx, PREFLIGHT_REJECTED)
            return Response(204, [_VARY_ORIGIN] if self._vary else [])
        self._count(ctx, PREFLIGHT)
        return Response(204, [(_ALLOW_ORIGIN, allowed), *self._preflight])


def build(config: CorsConfig, spec: StageSpec, env: BuildContext) -> CorsStage:
    return CorsStage(config, env.metrics.stage_total)


KIND: Final[StageKind[CorsConfig, CorsStage]] = StageKind(
    name="cors",
    parse=parse,
    build=build,
    example=EXAMPLE,
    check=_check,
    describe=_describe,
)
