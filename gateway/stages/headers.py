"""The `headers` stage (SPEC §5.7): set and remove request and response headers.

Names are matched without regard to case; `set` replaces every header of that name with one
value.  Everything is encoded and lower-cased once, when the stage is built.  Response edits
apply to the response the rest of the pipeline returned; an error answered by the gateway itself
(problem+json) is not edited.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Final, final

from gateway.config.model import StageSpec
from gateway.config.reader import Reader
from gateway.http.messages import Response
from gateway.pipeline import Next, RequestContext
from gateway.stages.converters import OWNED_REQUEST, OWNED_RESPONSE, check_name, header_values
from gateway.stages.kind import BuildContext, StageKind


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderEdits:
    """Headers set (replacing any of the same name) and removed, names as written."""

    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadersConfig:
    request: HeaderEdits = field(default_factory=HeaderEdits)
    response: HeaderEdits = field(default_factory=HeaderEdits)


EXAMPLE: Final = """\
request: {set: {X-Env: prod}, remove: [X-Debug]}
response: {set: {X-Frame-Options: DENY}}
"""


def parse(r: Reader, raw: object, path: str) -> HeadersConfig | None:
    m = r.mapping({} if raw is None else raw, path, {"request", "response"})
    if m is None:
        return None
    return HeadersConfig(
        request=_edits(r, m.get("request"), f"{path}.request", OWNED_REQUEST),
        response=_edits(r, m.get("response"), f"{path}.response", OWNED_RESPONSE),
    )


def _edits(r: Reader, raw: object, path: str, owned: frozenset[str]) -> HeaderEdits:
    if raw is None:
        return HeaderEdits()
    m = r.mapping(raw, path, {"set", "remove"})
    if m is None:
        return HeaderEdits()
    names: list[str] = []
    pairs = header_values(r, m.get("set"), f"{path}.set", owned)
    removed = m.get("remove")
    if removed is not None:
        if not isinstance(removed, list):
            r.error(f"{path}.remove", "must be a list of header names")
        else:
            for i, name in enumerate(removed):
                if check_name(r, name, f"{path}.remove[{i}]", owned):
                    names.append(str(name))
    return HeaderEdits(set=pairs, remove=tuple(names))


@final
class _Edits:
    __slots__ = ("drop", "lengths", "set")

    def __init__(self, edits: HeaderEdits) -> None:
        self.set = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in edits.set]
        # a set header replaces every copy of its name
        names = [*edits.remove, *(n for n, _ in edits.set)]
        self.drop = frozenset(n.lower().encode("latin-1") for n in names)
        # only a name of one of these lengths can be dropped: most headers are passed over
        # without lower-casing them
        self.lengths = frozenset(len(n) for n in self.drop)

    def _drops(self, name: bytes) -> bool:
        return len(name) in self.lengths and name.lower() in self.drop

    def drops_any(self, headers: list[tuple[bytes, bytes]]) -> bool:
        # compiled, any() over a generator is a plain loop that stops at the first hit
        return any(self._drops(name) for name, _ in headers)

    def apply(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """`headers` edited (in place when nothing is dropped, the common case)."""
        for name, _ in headers:
            if self._drops(name):
                headers = [(n, v) for n, v in headers if not self._drops(n)]
                break
        headers.extend(self.set)
        return headers


@final
class HeadersStage:
    __slots__ = ("_request", "_response")

    def __init__(self, config: HeadersConfig) -> None:
        self._request = (
            _Edits(config.request) if config.request.set or config.request.remove else None
        )
        self._response = (
            _Edits(config.response) if config.response.set or config.response.remove else None
        )

    def __call__(self, ctx: RequestContext, call_next: Next) -> Awaitable[Response]:
        """The request's edits, then the rest of the pipeline — wrapped in a coroutine of ours
        only when there are response edits to make on the way back (a frame costs a request
        ~1.2k instructions, callgrind)."""
        request_edits = self._request
        if request_edits is not None:
            head = ctx.head
            # Authorization may be removed or set here (it is not a name the gateway owns)
            if request_edits.drops_any(head.headers):
                head.replace_headers(request_edits.apply(head.headers))
            else:
                # nothing to drop (the common case): the set headers are appended, and only
                # their names classed (`replace_headers` classes every name again, ~0.6k)
                head.add_headers(request_edits.set)
        response_edits = self._response
        if response_edits is None:
            return call_next(ctx)
        return _edit_response(call_next(ctx), response_edits)


async def _edit_response(pending: Awaitable[Response], edits: _Edits) -> Response:
    response = await pending
    response.headers = edits.apply(response.headers)
    return response


def build(config: HeadersConfig, spec: StageSpec, env: BuildContext) -> HeadersStage:
    return HeadersStage(config)


KIND: Final[StageKind[HeadersConfig, HeadersStage]] = StageKind(
    name="headers", parse=parse, build=build, example=EXAMPLE
)
