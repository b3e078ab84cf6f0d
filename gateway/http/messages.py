"""The request and response objects that stages see.

`RequestHead` is filled by the server protocol while llhttp parses; `RequestBody` is the
request body as a bounded, flow-controlled stream; `Response` is what a pipeline returns: status,
headers and either a complete body or a `BodyStream` that the server protocol pumps to the
client after every stage has had its say on the head.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol, final

from gateway.errors import BadRequest, GatewayError, PayloadTooLarge, RequestTimeout
from gateway.http.headers import received_name_class

#: request-body bytes buffered before the client socket stops being read
BODY_HIGH_WATER = 256 * 1024
BODY_LOW_WATER = 64 * 1024


@final
class RequestHead:
    """The parsed request head.  Header pairs are kept exactly as received."""

    __slots__ = (
        "authorization",
        "chunked",
        "classes",
        "connection_tokens",
        "content_length",
        "early_data",
        "expect_continue",
        "forwarded",
        "headers",
        "host",
        "host_name",
        "keep_alive",
        "method",
        "path",
        "path_flags",
        "plain_target",
        "proxy_connection",
        "query",
        "raw_method",
        "request_id",
        "target",
        "traceparent",
        "tracestate",
        "upgrade",
        "version",
        "x_forwarded_for",
    )

    def __init__(self) -> None:
        self.method = ""
        self.raw_method = b""
        self.target = b""
        #: the target was already normal: it is forwarded as received when nothing is stripped
        self.plain_target = False
        self.path = "/"
        self.query = ""
        self.version = "1.1"
        #: changed only by `replace_headers` and `remove_headers` (the connection appends while
        #: parsing)
        self.headers: list[tuple[bytes, bytes]] = []
        #: each header's `name_class` bits, in step with `headers`: the connection classes each
        #: name once while parsing, where it lowers it anyway, and the way upstream reads them
        #: here instead of lowering and looking up every name again; a list of another length
        #: than `headers` is not believed (`header_classes`)
        self.classes: list[int] = []
        #: the Host header as received while parsing; normalized once the head is complete
        #: (gateway.http.host): trimmed, lower case, the port kept — what goes upstream
        self.host: bytes | None = None
        #: the normalized host name routing compares: no port, no trailing dot, IPv6 unbracketed
        self.host_name: str | None = None
        #: PATH_* flags of the normalized path (gateway.http.path)
        self.path_flags = 0
        #: the Authorization header's value as received (trailing whitespace kept), None without
        #: one; the connection refuses a second copy.  Derived from `headers`: kept in step with
        #: them by `replace_headers`
        self.authorization: bytes | None = None
        #: Forwarded header values, joined; re-written on the way upstream
        self.forwarded: bytes | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.expect_continue = False
        #: bytes a client sent after the head of a request to be tunnelled, before the 101:
        #: the tunnel's first bytes, written upstream once it switched protocols
        self.early_data = b""
        #: the Upgrade protocol while parsing; once the head is complete, set only when the
        #: request is to be tunnelled (a websocket route, Connection: upgrade, no body)
        self.upgrade: bytes | None = None
        self.connection_tokens: set[bytes] | None = None
        #: a Proxy-Connection header came (llhttp honours its keep-alive like Connection's)
        self.proxy_connection = False
        self.request_id: bytes | None = None
        self.x_forwarded_for: bytes | None = None
        #: the traceparent header; b"" when there were several (invalid: a new trace)
        self.traceparent: bytes | None = None
        #: tracestate header values, joined with ","
        self.tracestate: bytes | None = None

    def replace_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Make `headers` the header list (a new list, or the same one edited in place) and
        derive again what is read from it.

        The one way to change the list once the head is parsed (with `remove_headers`, which
        takes headers out and keeps the derived values right): the connection keeps the
        Authorization value it met while parsing (the jwt stage reads it rather than scan
        every header), and whatever removes or sets headers afterwards (a Connection header
        naming it, a headers stage, the jwt stage's forwarded-claim names) would otherwise
        leave that value stale — a token checked that the upstream never receives, or a
        token set for the upstream that is never checked.
        """
        self.headers = headers
        # by spelling, from the cache the connection filled while parsing these names
        self.classes = [received_name_class(n) for n, _ in headers]
        authorization: bytes | None = None
        for n, v in headers:
            # the first copy, as get_header reads it; only a name of its length is lowered
            if len(n) == 13 and n.lower() == b"authorization":
                authorization = v
                break
        self.authorization = authorization

    def add_headers(self, added: list[tuple[bytes, bytes]]) -> None:
        """Append `added` to the list, classing only the new names; Authorization is read again
        only when the list had none and one is added (the first copy is the one read)."""
        headers = self.headers
        classes = self.header_classes()
        for name, value in added:
            headers.append((name, value))
            classes.append(received_name_class(name))
        if self.authorization is None:
            for name, value in added:
                if len(name) == 13 and name.lower() == b"authorization":
                    self.authorization = value
                    break

    def remove_headers(self, indexes: list[int]) -> None:
        """Remove the headers at `indexes` (in ascending order) from the list, keeping `classes`
        in step without classing every name again; what is derived from the list is derived
        again (`replace_headers`) only when an Authorization header was among them."""
        headers = self.headers
        classes = self.header_classes()
        derive = False
        # from the last: an earlier index stays right.  pop, not del: compiled, a direct call
        for k in range(len(indexes) - 1, -1, -1):
            i = indexes[k]
            name = headers.pop(i)[0]
            classes.pop(i)
            if len(name) == 13 and name.lower() == b"authorization":
                derive = True
        if derive:
            self.replace_headers(headers)

    def header_classes(self) -> list[int]:
        """`classes`, made again when something set `headers` without `replace_headers`."""
        classes = self.classes
        if len(classes) != len(self.headers):
            classes = self.classes = [received_name_class(n) for n, _ in self.headers]
        return classes

    def get_header(self, name: str) -> str | None:
        """First value of a header (name in lower case), decoded as latin-1, without the
        optional whitespace around it (llhttp keeps trailing spaces and tabs: "k" and "k "
        must be one value wherever the gateway compares or keys on it)."""
        key = name.encode("latin-1")
        size = len(key)
        for n, v in self.headers:
            # a name of another length cannot match: no lower-case copy of it is made
            if len(n) == size and n.lower() == key:
                return v.decode("latin-1").strip(" \t")
        return None

    def get_single_header(self, name: str) -> str | None:
        """`get_header` for a header the gateway decides on: a second copy is refused with 400,
        since the upstream might read the other one."""
        key = name.encode("latin-1")
        found: bytes | None = None
        for n, v in self.headers:
            if n.lower() == key:
                if found is not None:
                    raise BadRequest(f"more than one {name} header")
                found = v
        return None if found is None else found.decode("latin-1").strip(" \t")

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class BodyCopier(Protocol):
    """Takes a copy of a request body as it arrives (the mirror stage): the chunks already
    buffered when it is attached, then each new one, then the end or the failure.  It never
    slows the body down, and it is told nothing more once `chunk` returns False (it wants no
    more: the body is larger than it copies)."""

    def chunk(self, data: bytes) -> bool: ...
    def end(self) -> None: ...
    def failed(self) -> None: ...


class BodyProducer(Protocol):
    """The side a `RequestBody` pauses when its buffer is full."""

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


@final
class RequestBody:
    """The request body as a stream: the parser feeds it, the proxy reads it.

    Memory stays bounded: above `high_water` buffered bytes (BODY_HIGH_WATER, or more when the
    route buffers larger bodies whole) the client socket is paused, below BODY_LOW_WATER it is
    resumed.  A read waits at most `timeout` seconds for the next chunk, and `check_rate` (called
    by the connection's sweeper) fails a body that arrives slower than the minimum data rate:
    every `grace`-long window of waiting, from the first time someone waited for it, must bring
    that rate — never counting time the gateway itself kept the socket paused, and never
    averaging over the whole body (a client that sent 70 kB at once then one byte every four
    seconds would otherwise hold its upstream connection for over a minute).
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_error",
        "_high_water",
        "_loop",
        "_paused",
        "_paused_since",
        "_paused_total",
        "_producer",
        "_rate_start",
        "_replay",
        "_timer",
        "_waiter",
        "_window_received",
        "_window_waited",
        "copier",
        "eof",
        "limit",
        "on_first_read",
        "received",
        "timeout",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        producer: BodyProducer,
        limit: int,
        timeout: float,
        high_water: int = BODY_HIGH_WATER,
    ) -> None:
        self._loop = loop
        self._producer = producer
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._high_water = high_water
        self._paused = False
        #: when a reader first waited for data (0: nobody has yet); the rate is measured from it
        self._rate_start = 0.0
        #: time the gateway kept the client paused (its own back-pressure: not the client's fault)
        self._paused_since = 0.0
        self._paused_total = 0.0
        #: where the current rate window began: seconds waited, and bytes received, by then
        self._window_waited = 0.0
        self._window_received = 0
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._error: GatewayError | None = None
        self._replay = b""
        self.eof = False
        self.limit = limit
        self.timeout = timeout
        self.received = 0
        #: called once before the first read (the server sends "100 Continue" from it)
        self.on_first_read: Callable[[], None] | None = None
        #: sees every chunk as it is fed (see `attach`); None for nearly every request, so the
        #: cost of the hook on the parser's side is this one attribute check
        self.copier: BodyCopier | None = None

    # -- the parser's side -------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.limit:
            self.fail(PayloadTooLarge(f"request body exceeds {self.limit} bytes"))
            return
        if self._error is not None:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        copier = self.copier
        if copier is not None and not copier.chunk(data):
            self.copier = None
        if self._buffered > self._high_water and not self._paused:
            self._paused = True
            if self._rate_start:
                self._paused_since = self._loop.time()
            self._producer.pause_reading()
        self._wake()

    def feed_eof(self) -> None:
        self.eof = True
        copier = self.copier
        if copier is not None:
            self.copier = None
            copier.end()
        self._wake()

    def fail(self, error: GatewayError) -> None:
        if self._error is None:
            self._error = error
            self._chunks.clear()
            self._buffered = 0
        copier = self.copier
        if copier is not None:
            self.copier = None
            copier.failed()
        self._wake()

    def attach(self, copier: BodyCopier) -> None:
        """Have `copier` see the whole body: what has arrived so far at once (nothing has been
        read yet, or what was read is kept for a replay), then each chunk as it is fed."""
        if self._error is not None:
            copier.failed()
            return
        if self._replay and not copier.chunk(self._replay):
            return
        for data in self._chunks:
            if not copier.chunk(data):
                return
        if self.eof:
            copier.end()
            return
        self.copier = copier

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not waiter.done():
                waiter.set_result(None)

    # -- the reader's side -------------------------------------------------------------------

    def check(self) -> None:
        """Raise the body's error, if it has one."""
        if self._error is not None:
            raise self._error

    @property
    def is_complete(self) -> bool:
        """True when the whole body is buffered (it can be replayed without waiting)."""
        return self.eof and self._error is None

    def take_all(self) -> bytes:
        """The whole body of a complete request, consumed; may be called again (for a retry)."""
        if self._chunks:
            data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
            self._chunks.clear()
            self._buffered = 0
            self._replay = data
        return self._replay

    async def fill(self, limit: int) -> bool:
        """Wait until the whole body is buffered, unless it grows past `limit` bytes first.

        True when it is complete (then it can be sent, and sent again, by `take_all`); False
        when it is larger than `limit`, with nothing consumed, so it can still be streamed.
        """
        while True:
            if self._error is not None:
                raise self._error
            if self.eof:
                return True
            if self._buffered > limit or self.received > limit:
                return False
            await self._more()

    async def read(self) -> bytes:
        """The next chunk; b"" at the end of the body."""
        while True:
            if self._error is not None:
                raise self._error
            if self._chunks:
                data = self._chunks.popleft()
                self._buffered -= len(data)
                if self._paused and self._buffered < BODY_LOW_WATER:
                    self._paused = False
                    if self._paused_since:
                        self._paused_total += self._loop.time() - self._paused_since
                        self._paused_since = 0.0
                    self._producer.resume_reading()
                return data
            if self.eof:
                return b""
            await self._more()

    async def _more(self) -> None:
        """Wait for the next chunk, the end, or an error — at most `timeout` seconds."""
        first = self.on_first_read
        if first is not None:
            self.on_first_read = None
            first()
        loop = self._loop
        if not self._rate_start:
            self._rate_start = loop.time()
            if self._paused:
                self._paused_since = self._rate_start
        waiter = loop.create_future()
        self._waiter = waiter
        self._timer = loop.call_later(self.timeout, self._on_timeout)
        await waiter

    def check_rate(self, now: float, min_rate: int, grace: float) -> bool:
        """Fail the body (408) if, over the last `grace` seconds or more of waiting for it, fewer
        than `min_rate` bytes a second arrived; True when it did so now."""
        start = self._rate_start
        if not start or self.eof or self._error is not None:
            return False
        waited = now - start - self._paused_total
        if self._paused_since:
            waited -= now - self._paused_since
        window = waited - self._window_waited
        if window < grace:
            return False
        if self.received - self._window_received >= min_rate * window:
            self._window_waited = waited  # a new window begins
            self._window_received = self.received
            return False
        self.fail(RequestTimeout(f"the request body arrived slower than {min_rate} bytes a second"))
        return True

    def _on_timeout(self) -> None:
        self._timer = None
        self.fail(RequestTimeout("the request body did not arrive in time"))


class BodySink(Protocol):
    """Where a `BodyStream` writes: the server protocol (or a stage wrapping it)."""

    def write(self, data: bytes) -> None: ...


class BodyStream(Protocol):
    """A response body that is still arriving (from an upstream connection)."""

    #: the announced length, or None when it is not known (chunked or close-delimited)
    length: int | None

    def pipe(self, sink: BodySink) -> Awaitable[None]:
        """Write every remaining chunk into `sink`; completes at the end of the body."""
        ...

    def pause(self) -> None:
        """The sink is full: stop reading the source."""
        ...

    def resume(self) -> None: ...

    def progressing(self) -> None:
        """Still paused, but the reader keeps up with the minimum rate: not stalled (a stalled
        reader's upstream connection may be taken back for a waiting request)."""
        ...

    def abort(self) -> None:
        """The client went away or the body is not wanted: release the source."""
        ...

    def release_unused(self) -> None:
        """The head went out but no body follows (HEAD, 204, 304): give the source back, for
        reuse where the body already arrived whole, else as `abort` does."""
        ...


class Tunnel(Protocol):
    """The upstream end of a tunnel (a 101 answer to a WebSocket handshake), as the server
    protocol drives it: bytes both ways, flow control, and the end."""

    def forward(self, data: bytes) -> None:
        """Client bytes to the upstream (dropped if it is gone)."""
        ...

    def start_tunnel(self, on_data: Callable[[bytes], None], peer: BodyProducer) -> None:
        """Upstream bytes go to `on_data` from now on (b"" at the end); `peer` is paused while
        the upstream's write buffer is full."""
        ...

    def pause(self) -> None:
        """The client reads slowly: stop reading the upstream."""
        ...

    def resume(self) -> None: ...

    def close(self) -> None: ...


#: how an exchange ended, for `Completion` observers: the whole body arrived (True), the upstream
#: cut it short — a reset, a close, a body timeout, garbage (False), or the client abandoned it,
#: which says nothing about the upstream (None)
Outcome = bool | None
Observer = Callable[[Outcome], None]


@final
class Completion:
    """The end of a streamed response, for those who judge the upstream by it.

    A response is a success only when its whole body arrived (SPEC §5.4, issue 12): the circuit
    breaker and outlier detection record an exchange whose head arrived when its body ends, not
    when the head does.  The upstream connection finishes it exactly once.
    """

    __slots__ = ("_observers", "outcome")

    def __init__(self) -> None:
        self._observers: list[Observer] = []
        #: how it ended, once it has (observers added later are not told: add them first)
        self.outcome: Outcome = None

    def add(self, observer: Observer) -> None:
        self._observers.append(observer)

    def finish(self, outcome: Outcome) -> None:
        observers = self._observers
        if not observers:
            return
        self._observers = []
        self.outcome = outcome
        for observer in observers:
            observer(outcome)


@final
class Response:
    """A response on its way downstream.

    `headers` exclude framing (Content-Length, Transfer-Encoding): the server protocol frames the
    body itself from `body` / `stream`.  Exactly one of them carries the body.  A streamed one
    from an upstream has a `completion`: how its body ended (None when the body is here whole).
    """

    __slots__ = ("body", "completion", "headers", "reason", "status", "stream", "tunnel")

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
        stream: BodyStream | None = None,
        reason: bytes | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.stream = stream
        self.reason = reason
        self.completion: Completion | None = None
        #: a 101 from an upstream on a WebSocket route: the server protocol tunnels through it
        self.tunnel: Tunnel | None = None
