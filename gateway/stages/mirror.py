"""The `mirror` stage (SPEC §5.8): a copy of a share of the route's requests goes to a second
upstream, and its answer is thrown away.

The client's request is never held back or changed by it: the stage starts the copy and goes
straight on down the pipeline.  The copy is taken from the request as it reaches this stage (the
headers earlier stages set for the upstream included), with its body copied as the client sends
it — `RequestBody.attach` hands the chunks to the copy as the parser feeds them, so the main
upstream still gets the body streamed with its own back-pressure, never waiting on the mirror.
Once the whole body has arrived, head and body go to the mirror upstream in one write, on a
connection of that upstream's pool, within its connect, queue and response-header timeouts and
never for longer than the route's `timeout`; the mirror's response is read to its end (so the
connection can be reused) and dropped.

Bounds: a body larger than `max_body_bytes` is not mirrored (its Content-Length says so up front,
or the copy is abandoned when a streamed body grows past it), so the memory the copies hold is at
most `max_in_flight` times `max_body_bytes` per stage; beyond `max_in_flight` copies in flight a
request is not mirrored.  `sample_ratio` is the share of requests mirrored (0 to 1).

The mirror can tell a copy from live traffic by `X-Mirror: 1` (the gateway removes a client's
own X-Mirror from the copy, so only the gateway's can be there).  Envoy instead appends
`-shadow` to the Host; a header was chosen because a changed Host breaks virtual hosting on
mirror upstreams that serve the same names as the main one, and a header is also easy to log.

Outcomes (gateway_stage_total{stage="mirror"}): `mirrored` (the mirror answered, whatever its
status), `skipped` (not sampled, or the body too large, or the client's body failed),
`dropped` (max_in_flight copies were in flight), `failed` (the mirror could not be reached,
reset, or timed out), `cancelled` (a reload replaced the stage, or the gateway stopped, while
the copy was in flight).  The access log shows the decision made with the request: `copied`,
`skipped` or `dropped` (how the copy ends is known only after the client has its answer).

A reload that replaces the stage, and shutdown, cancel the copies it has in flight: a copy is
never worth delaying either.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Final, final

from gateway.config.model import StageSpec
from gateway.config.reader import Fields, Reader, as_int, as_str
from gateway.config.stages import PipelineCheck
from gateway.config.units import parse_size
from gateway.errors import ConfigError, GatewayError
from gateway.http.forwarding import build_request_head, upstream_target
from gateway.http.messages import RequestBody, Response
from gateway.observability.instruments import Counter
from gateway.pipeline import Next, RequestContext
from gateway.stages.kind import BuildContext, StageKind
from gateway.stages.outcomes import StageOutcomes
from gateway.upstream.upstream import Upstream


@dataclass(frozen=True, slots=True, kw_only=True)
class MirrorConfig:
    #: a declared upstream's name
    upstream: str
    #: the share of requests copied, 0 to 1
    sample_ratio: float = 1.0
    #: larger request bodies are not copied
    max_body_bytes: int = 64 * 1024
    #: copies in flight at once (per stage); more requests are not copied
    max_in_flight: int = 100


EXAMPLE: Final = """\
upstream: orders-shadow
sample_ratio: 0.1
max_body_bytes: 64KiB
max_in_flight: 100
"""


def _ratio(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(path, "must be a number from 0 to 1")
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(path, f"must be from 0 to 1, not {value}")
    return float(value)


def _positive(value: object, path: str) -> int:
    result = as_int(value, path)
    if result < 1:
        raise ConfigError(path, "must be at least 1")
    return result


def _check_fields(r: Reader, config: MirrorConfig, path: str) -> None:
    known = r.upstreams
    if known is not None and config.upstream not in known:
        listed = ", ".join(sorted(known)) or "none declared"
        r.error(f"{path}.upstream", f"unknown upstream {config.upstream!r}; upstreams: {listed}")


_FIELDS: Final = Fields(
    MirrorConfig,
    {
        "upstream": as_str,
        "sample_ratio": _ratio,
        "max_body_bytes": parse_size,
        "max_in_flight": _positive,
    },
    required=("upstream",),
    check=_check_fields,
)


def _check(check: PipelineCheck, config: MirrorConfig) -> MirrorConfig:
    if "mirror" in check.kinds_before:
        check.error("a route has one mirror stage: each copy would be sent by both")
    if "retry" in check.kinds_before:
        # every try passes the stages after retry again: each would send another copy
        check.error("mirror must come before retry: each try would send the mirror a copy")
    return config


def _describe(config: MirrorConfig) -> dict[str, Any]:
    return {"upstream": config.upstream, "sample_ratio": config.sample_ratio}


#: outcomes (see the module's docstring)
MIRRORED: Final = "mirrored"
SKIPPED: Final = "skipped"
DROPPED: Final = "dropped"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"
#: the access log's word for a copy started with the request
COPIED: Final = "copied"

#: how a body copy ended
_COMPLETE: Final = 0
_TOO_LARGE: Final = 1
_BODY_FAILED: Final = 2


@final
class _BodyCopy:
    """A `BodyCopier`: the body's chunks up to a limit; `done` says how the body ended."""

    __slots__ = ("_chunks", "_limit", "_size", "done")

    def __init__(self, limit: int, done: asyncio.Future[int]) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit
        self.done = done

    def chunk(self, data: bytes) -> bool:
        self._size += len(data)
        if self._size > self._limit:
            self._chunks = []
            self._settle(_TOO_LARGE)
            return False
        self._chunks.append(data)
        return True

    def end(self) -> None:
        self._settle(_COMPLETE)

    def failed(self) -> None:
        self._chunks = []
        self._settle(_BODY_FAILED)

    def _settle(self, how: int) -> None:
        if not self.done.done():
            self.done.set_result(how)

    def body(self) -> bytes:
        return b"".join(self._chunks)


def _without_client_mark(request: bytes) -> bytes:
    """The open head (each line ends with CRLF) without the client's own X-Mirror lines: only
    the gateway's mark may reach the mirror."""
    lines = request.split(b"\r\n")
    kept = [line for line in lines[:-1] if line[:9].lower() != b"x-mirror:"]
    return b"\r\n".join([*kept, b""])


@final
class _Discard:
    """Where the mirror's response body goes."""

    __slots__ = ()

    def write(self, data: bytes) -> None:
        pass


@final
class MirrorStage:
    __slots__ = (
        "_loop",
        "_max_body",
        "_max_in_flight",
        "_outcomes",
        "_ratio",
        "name",
        "tasks",
    )

    def __init__(
        self, config: MirrorConfig, total: Counter, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.name = config.upstream
        self._ratio = config.sample_ratio
        self._max_body = config.max_body_bytes
        self._max_in_flight = config.max_in_flight
        self._outcomes = StageOutcomes(total, "mirror")
        self._loop = loop
        #: the copies in flight (kept here, as the loop keeps only weak references to tasks)
        self.tasks: set[asyncio.Task[None]] = set()

    def _count(self, route: str, outcome: str) -> None:
        self._outcomes.count(route, outcome)

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Response:
        ctx.outcome("mirror", self._start(ctx))
        return await call_next(ctx)

    def _start(self, ctx: RequestContext) -> str:
        """Start the request's copy, if it gets one; the access log's word for the decision."""
        route = ctx.route.name
        head = ctx.head
        ratio = self._ratio
        if ratio < 1.0 and not random.random() < ratio:
            self._count(route, SKIPPED)
            return SKIPPED
        # a tunnel (WebSocket) is a conversation, not a request to copy
        if head.upgrade is not None or (
            head.content_length is not None and head.content_length > self._max_body
        ):
            self._count(route, SKIPPED)
            return SKIPPED
        if len(self.tasks) >= self._max_in_flight:
            self._count(route, DROPPED)
            return DROPPED
        upstream = ctx.snapshot.upstreams.get(self.name)
        if upstream is None:  # checked at load; only a bug gets here
            self._count(route, FAILED)
            return FAILED
        # the head is built now, from the request as it reaches this stage (later stages may
        # still edit the header list in place), without framing: its length is known at the end
        peer = ctx.peer
        request = build_request_head(
            head,
            upstream_target(head, ctx.route.config.strip_prefix),
            client=peer.ip_bytes,
            trusted_peer=peer.trusted,
            scheme=peer.scheme_bytes,
            request_id=ctx.request_id,
            content_length=None,
            chunked=False,
            default_host=upstream.default_host,
            extra=ctx.upstream_headers,
            forward_underscores=ctx.route.forward_underscores,
        )[:-2]  # open: the mark and the length are added in front of the blank line
        for name, _ in head.headers:
            if len(name) == 8 and name.lower() == b"x-mirror":
                request = _without_client_mark(request)
                break
        body = ctx.body
        copy: _BodyCopy | None = None
        if body is not None:
            copy = _BodyCopy(self._max_body, self._loop.create_future())
            body.attach(copy)
        task = self._loop.create_task(
            self._counting_cancel(
                route, self._send(ctx, upstream, request, body, copy, head.method == "HEAD")
            )
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return COPIED

    async def _counting_cancel(self, route: str, sending: Coroutine[Any, Any, None]) -> None:
        """`sending`, counted as cancelled when a reload replacing the stage, or shutdown,
        cancels it: every copy started is counted once."""
        try:
            await sending
        except asyncio.CancelledError:
            self._count(route, CANCELLED)
            raise

    async def _send(
        self,
        ctx: RequestContext,
        upstream: Upstream,
        request: bytes,
        body: RequestBody | None,
        copy: _BodyCopy | None,
        is_head: bool,
    ) -> None:
        route = ctx.route.name
        # never longer than the client's own request may take
        timeout = ctx.route.timeout
        if copy is not None:
            try:
                how = await copy.done
            finally:
                if body is not None and body.copier is copy:
                    body.copier = None  # cancelled: the body need not feed it any more
            if how != _COMPLETE:
                self._count(route, SKIPPED)
                return
            data = copy.body()
            request = b"%bX-Mirror: 1\r\nContent-Length: %d\r\n\r\n%b" % (request, len(data), data)
        else:
            request += b"X-Mirror: 1\r\n\r\n"
        try:
            async with asyncio.timeout(timeout):
                await self._exchange(upstream, request, is_head, ctx)
        except (GatewayError, TimeoutError, OSError):
            self._count(route, FAILED)
            return
        self._count(route, MIRRORED)

    async def _exchange(
        self, upstream: Upstream, request: bytes, is_head: bool, ctx: RequestContext
    ) -> None:
        endpoint = upstream.pick(None)
        pool = endpoint.pool
        conn = pool.take_idle()
        try:
            if conn is None:
                conn = await pool.acquire(
                    upstream.connect_timeout, upstream.queue_timeout, "mirror"
                )
            response = await conn.send(
                request,
                None,
                False,
                is_head,
                upstream.response_header_timeout,
                ctx.snapshot.body_timeout,
            )
            if response.status == 101 or conn.take_complete_body() is not None:
                if response.status == 101:
                    conn.abort()
                return
            await conn.pipe(_Discard())
        except BaseException:
            if conn is not None:
                conn.abort()
            raise

    def describe(self) -> dict[str, dict[str, Any]]:
        """/admin/upstreams, under the mirror upstream's "mirrors": its copies under way (they
        are not the upstream's `in_flight`, which counts the requests routed to it)."""
        return {
            self.name: {
                "sample_ratio": self._ratio,
                "in_flight": len(self.tasks),
                "max_in_flight": self._max_in_flight,
            }
        }

    def cancel_all(self) -> None:
        for task in list(self.tasks):
            task.cancel()


def build(config: MirrorConfig, spec: StageSpec, env: BuildContext) -> MirrorStage:
    return MirrorStage(config, env.metrics.stage_total, env.loop)


def _cancel(stage: MirrorStage) -> None:
    stage.cancel_all()


KIND: Final[StageKind[MirrorConfig, MirrorStage]] = StageKind(
    name="mirror",
    parse=_FIELDS.parse,
    build=build,
    example=EXAMPLE,
    check=_check,
    describe=_describe,
    retire=_cancel,
    close=_cancel,
    upstreams=MirrorStage.describe,
)
