"""One keep-alive HTTP/1.1 connection to an upstream endpoint, parsed with llhttp.

The connection is also the `BodyStream` of the response it is reading: once the head has arrived
the proxy returns it to the server protocol, which pipes the body straight from this protocol's
callbacks into the client's transport — no task and no await per chunk.  Flow control goes both
ways through `pause()`/`resume()` and the transport's `pause_writing()`/`resume_writing()`.

Invariant: a connection that saw any error, or a response it could not read to the end, is
never reused (`reusable` stays False and the pool closes it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast, final

import httptools

from gateway.core.waiter import Waiter
from gateway.errors import GatewayError, RequestTimeout, UpstreamTimeout, UpstreamUnavailable
from gateway.http.flow import Drain, not_connected
from gateway.http.headers import HOP_BY_HOP, connection_tokens
from gateway.http.messages import BodyProducer, BodySink, Completion, RequestBody, Response

if TYPE_CHECKING:
    from gateway.upstream.pool import EndpointPool

#: Connection tokens that name no end-to-end header (already dropped, or not header names)
HOP_BY_HOP_AND_CLOSE: Final = HOP_BY_HOP | {b"close"}

# response header names handled in on_header, by kind: one dict lookup per header
_CONNECTION: Final = 1
_CONTENT_LENGTH: Final = 2
_TRANSFER_ENCODING: Final = 3
_UPGRADE: Final = 4
_DROPPED: Final = 5
#: a header the response carries on as it came
_ORDINARY: Final = 0
_RESPONSE_SPECIAL: Final[dict[bytes, int]] = {
    **dict.fromkeys(HOP_BY_HOP, _DROPPED),
    # the gateway answers with the id the upstream was sent; a second one would be noise
    b"x-request-id": _DROPPED,
    b"connection": _CONNECTION,
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"upgrade": _UPGRADE,
}

#: a response header's name as an upstream spelled it -> its kind (_ORDINARY or one of the
#: above); upstreams choose spellings, so it is emptied when it grows past this
_RECEIVED_KINDS: Final[dict[bytes, int]] = {}
_RECEIVED_KINDS_SIZE: Final = 4096


def _received_kind(name: bytes) -> int:
    kind = _RESPONSE_SPECIAL.get(name.lower(), _ORDINARY)
    if len(_RECEIVED_KINDS) >= _RECEIVED_KINDS_SIZE:
        _RECEIVED_KINDS.clear()
    _RECEIVED_KINDS[name] = kind
    return kind


#: response-body bytes buffered before the sink is attached (then the upstream socket pauses)
_EARLY_BODY_LIMIT = 256 * 1024
#: the longest response head read from an upstream (1xx heads included), and how much chunk
#: framing and trailers may exceed the body: llhttp buffers a header until it ends, so an
#: upstream sending one forever would otherwise grow memory without bound
MAX_RESPONSE_HEAD = 64 * 1024


class StaleConnection(UpstreamUnavailable):
    """A reused connection closed before any response byte: safe to retry on a fresh one."""


@final
class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_active",
        "_body_chunks",
        "_body_received",
        "_body_timeout",
        "_chunked",
        "_chunks_len",
        "_closed",
        "_done",
        "_drain",
        "_failure",
        "_feed",
        "_got_bytes",
        "_head_arrived",
        "_head_waiter",
        "_headers",
        "_is_head",
        "_keep_alive",
        "_keeps_alive",
        "_last_activity",
        "_length_header",
        "_loop",
        "_message_done",
        "_named",
        "_paused_by_sink",
        "_raw_read",
        "_read_paused",
        "_reset_parser",
        "_send_bytes",
        "_sink",
        "_status",
        "_status_code",
        "_time",
        "_timer",
        "_upgrade_header",
        "_upgraded",
        "_write_paused",
        "close_delimited",
        "completion",
        "deadline",
        "detached",
        "idle_since",
        "in_use",
        "length",
        "on_upgrade_data",
        "parser",
        "pool",
        "reusable",
        "reused",
        "stalled_since",
        "transport",
        "tunnel_peer",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: EndpointPool) -> None:
        self._loop = loop
        self._time = pool.loop_time
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        #: the parser's methods a response calls, bound once per parser (a method looked up
        #: per call costs ~100 instructions, callgrind): set wherever `parser` is
        self._feed = self.parser.feed_data
        self._status_code = self.parser.get_status_code
        self._keeps_alive = self.parser.should_keep_alive
        #: `transport.write`, bound once the transport is known (a request's head is one call)
        self._send_bytes: Callable[[bytes], object] = not_connected
        self.reusable = False
        self.reused = False
        self.in_use = False
        self.idle_since = 0.0
        self._closed = False
        self._write_paused = False
        self._read_paused = False
        #: a request body waiting for the upstream to read what it was sent (flow control)
        self._drain = Drain(loop)
        #: when the client stopped reading the response this connection carries (0: it reads)
        self.stalled_since = 0.0
        #: a tunnel now, no longer counted in the pool
        self.detached = False
        self._reset_exchange()
        #: the head waiter settled by the callback under way, woken as it returns
        self._head_arrived: Waiter[Response] | None = None
        self._body_timeout = 30.0
        self.on_upgrade_data: Callable[[bytes], None] | None = None
        self.tunnel_peer: BodyProducer | None = None

    def _reset_exchange(self) -> None:
        self._head_waiter: Waiter[Response] | None = None
        #: created only when a body is piped: most responses arrive whole and never need it
        self._done: asyncio.Future[None] | None = None
        self._failure: GatewayError | None = None
        #: between send() and the end of the exchange
        self._active = False
        self._timer: asyncio.TimerHandle | None = None
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        #: response framing and hop-by-hop headers, set aside by on_header
        self._named: set[bytes] | None = None
        self._length_header: tuple[bytes, bytes] | None = None
        self._upgrade_header: tuple[bytes, bytes] | None = None
        self._chunked = False
        #: when the response head must have arrived (0: not waiting); the pool checks it
        self.deadline = 0.0
        self._keep_alive = True
        self._is_head = False
        self._body_chunks: list[bytes] = []
        self._chunks_len = 0
        self._sink: BodySink | None = None
        self._message_done = False
        self._got_bytes = False
        self._paused_by_sink = False
        self._upgraded = False
        self._reset_parser = False
        self._last_activity = 0.0
        #: raw bytes read for this exchange, and the body's bytes among them (MAX_RESPONSE_HEAD)
        self._raw_read = 0
        self._body_received = 0
        self.length: int | None = None
        self.close_delimited = False
        #: set by the proxy when it hands the response on with its body still to come
        self.completion: Completion | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its interface
        self.use_transport(cast(asyncio.Transport, transport))
        self.reusable = True  # until an exchange says otherwise

    def use_transport(self, transport: asyncio.Transport) -> None:
        """Write to `transport` from now on: the connected socket's, then the TLS one over it
        (the pool's handshake).  The one way `transport` is set, so that the bound write
        always belongs to it."""
        self.transport = transport
        self._send_bytes = transport.write

    def data_received(self, data: bytes) -> None:
        self._received(data)
        arrived = self._head_arrived
        if arrived is not None:
            # the proxy goes on now that llhttp has returned and this protocol's state is whole
            # (for a driven request, right here: gateway.core.waiter)
            self._head_arrived = None
            arrived.wake()

    def _received(self, data: bytes) -> None:
        if self._upgraded:
            self._tunnel_data(data)
            return
        if not self._active:
            # bytes nobody asked for: the connection is out of step, never reuse it
            self.close()
            return
        self._got_bytes = True
        if self._timer is not None:
            self._last_activity = self._time()  # only the body timer reads it
        counted = not self._status or self._chunked
        if counted:
            # a head still arriving, or a chunked body: what is not body is bounded (the rest
            # of a body is bounded by back-pressure)
            self._raw_read += len(data)
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded = True
            rest = data[exc.args[0] :]
            if rest:
                self._tunnel_data(rest)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self._fail(
                cause
                if isinstance(cause, UpstreamUnavailable)
                else UpstreamUnavailable(f"invalid response from upstream: {exc}")
            )
        else:
            if counted and not self._message_done and (
                (not self._status and self._raw_read > MAX_RESPONSE_HEAD)
                or (self._chunked and self._raw_read - 2 * self._body_received > MAX_RESPONSE_HEAD)
            ):
                self._fail(UpstreamUnavailable("upstream response head or framing too large"))

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost does the bookkeeping

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.reusable = False
        if self._upgraded:
            if self.on_upgrade_data is not None:
                self.on_upgrade_data(b"")
        elif self.close_delimited and self._status and not self._message_done:
            # a response without framing ends when the upstream closes
            self.on_message_complete()
        elif self._active and not self._message_done:
            if not self._got_bytes and self.reused:
                self._fail(StaleConnection("upstream closed a kept-alive connection"))
            else:
                self._fail(UpstreamUnavailable("upstream closed the connection"))
        if not self.detached:
            self.pool.on_connection_lost(self)
        self._drain.release()  # the body's writer finds the connection closed

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.tunnel_peer is not None:
            # the upstream reads a tunnel slower than the client writes: slow the client down
            self.tunnel_peer.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.tunnel_peer is not None:
            self.tunnel_peer.resume_reading()
        self._drain.release()

    # -- llhttp callbacks --------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._status:
            return  # trailers of a chunked response: dropped
        # by the name as spelled: an upstream repeats its spellings, so no lower-case copy
        kind = _RECEIVED_KINDS.get(name)
        if kind is None:
            kind = _received_kind(name)
        if kind == _ORDINARY:
            self._headers.append((name, value))
        elif kind == _CONNECTION:
            # "keep-alive" and "close" name no header: llhttp already applied them
            if value.lower() not in HOP_BY_HOP_AND_CLOSE:
                tokens = connection_tokens(value)
                self._named = tokens if self._named is None else self._named | tokens
        elif kind == _CONTENT_LENGTH:
            self._length_header = (name, value)
        elif kind == _TRANSFER_ENCODING:
            self._chunked = True
        elif kind == _UPGRADE:
            self._upgrade_header = (name, value)

    def on_headers_complete(self) -> None:
        if self._status:
            # a second final response in one exchange: the upstream is out of step (whatever
            # follows a response it sent unasked must never reach a client)
            raise UpstreamUnavailable("upstream sent more than one response")
        self.deadline = 0.0
        status = self._status_code()
        if not 100 <= status <= 599:
            raise UpstreamUnavailable(f"upstream answered with status {status}")
        if 100 <= status < 200 and status != 101:
            # interim response (100 Continue, 103 Early Hints): the final one follows
            self._headers = []
            self._named = None
            self._length_header = None
            self._upgrade_header = None
            self._chunked = False
            return
        self._status = status
        self._keep_alive = self._keeps_alive()
        headers = self._headers
        self._headers = []
        length_header = self._length_header
        length = int(length_header[1]) if length_header is not None else None
        if length_header is not None and (self._is_head or status == 304):
            headers.append(length_header)  # describes the body a GET would have had
        if status == 101 and self._upgrade_header is not None:
            headers.append(self._upgrade_header)  # the tunnel needs it
        named = self._named
        if named:
            if status == 101:
                named.discard(b"upgrade")
            named -= HOP_BY_HOP_AND_CLOSE
            if named:
                headers = [(n, v) for n, v in headers if n.lower() not in named]
        chunked = self._chunked
        no_body = self._is_head or status in (101, 204, 304)
        if no_body:
            self.length = 0
            if self._is_head and (chunked or length):
                # llhttp cannot be told that a HEAD response has no body: start afresh next time
                self._reset_parser = True
        elif chunked:
            self.length = None
        elif length is not None:
            self.length = length
        else:
            self.length = None
            self.close_delimited = True
            self._keep_alive = False
        response = Response(status, headers, stream=self)
        waiter = self._head_waiter
        self._head_waiter = None
        if waiter is not None and not waiter.done():
            # woken when data_received returns, not from inside llhttp's callback
            waiter.settle(response)
            self._head_arrived = waiter
        if no_body:
            self.on_message_complete()
        elif status == 101:
            self._upgraded = True

    def on_body(self, data: bytes) -> None:
        self._body_received += len(data)
        sink = self._sink
        if sink is not None:
            sink.write(data)
            return
        self._hold(data)

    def _hold(self, data: bytes) -> None:
        """Keep bytes that arrived before anyone takes them — the body before its sink is
        attached, or a tunnel's first bytes — pausing the socket past _EARLY_BODY_LIMIT."""
        self._body_chunks.append(data)
        self._chunks_len += len(data)
        if self._chunks_len > _EARLY_BODY_LIMIT:
            self._set_reading(False)

    def _take_held(self) -> list[bytes]:
        """What `_hold` kept, now the sink (or tunnel) that takes it is there."""
        chunks = self._body_chunks
        self._body_chunks = []
        self._chunks_len = 0
        return chunks

    def on_message_complete(self) -> None:
        if not self._status or self._message_done:
            return
        self._message_done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)
        if self._sink is not None:
            self._finish()

    # -- the proxy's side --------------------------------------------------------------------

    async def send(
        self,
        head: bytes,
        body: RequestBody | None,
        chunked: bool,
        is_head: bool,
        header_timeout: float,
        body_timeout: float,
    ) -> Response:
        """Send a request and return the response once its head has arrived."""
        transport = self.transport
        if transport is None or self._closed:
            raise StaleConnection("connection closed")
        loop = self._loop
        if self._reset_parser:
            self.parser = httptools.HttpResponseParser(self)
            self._feed = self.parser.feed_data
            self._status_code = self.parser.get_status_code
            self._keeps_alive = self.parser.should_keep_alive
        self._reset_exchange()
        self._is_head = is_head
        self._body_timeout = body_timeout
        head_waiter: Waiter[Response] = Waiter(loop)
        self._head_waiter = head_waiter
        self._active = True
        if body is None:
            self._send_bytes(head)
        elif body.is_complete and not chunked:
            self._send_bytes(head + body.take_all())
        else:
            transport.write(head)
            # stream the body while the response may already be coming back; the wait for the
            # response head starts once the whole body is sent
            sender = loop.create_task(self._send_body(body, chunked, header_timeout))
            try:
                return await head_waiter
            finally:
                if not sender.done():
                    # the upstream answered before it had the whole body: never reuse
                    self.reusable = False
                    self._keep_alive = False
                    sender.cancel()
                elif not sender.cancelled() and sender.exception() is not None:
                    self._keep_alive = False
        self.deadline = self._time() + header_timeout
        self.pool.watch()
        return await head_waiter

    async def _send_body(self, body: RequestBody, chunked: bool, header_timeout: float) -> None:
        transport = self.transport
        assert transport is not None
        try:
            while True:
                # waiting on the client: a stalled upload may lose this connection to a request
                # waiting for one (the pool's eviction), as a stalled reader does
                self.stalled_since = self._time()
                try:
                    data = await body.read()
                finally:
                    self.stalled_since = 0.0
                if not data:
                    break
                if chunked:
                    transport.write(b"%x\r\n%b\r\n" % (len(data), data))
                else:
                    transport.write(data)
                if self._write_paused and not self._closed:
                    try:
                        await asyncio.wait_for(self._drain.wait(), self._body_timeout)
                    except TimeoutError:
                        raise UpstreamTimeout("upstream stopped reading the request body") from None
            if chunked:
                transport.write(b"0\r\n\r\n")
        except GatewayError as exc:
            # the client's body failed (too large, too slow) or the upstream stalled: void
            self._fail(exc)
            raise
        if self._head_waiter is not None:
            self.deadline = self._time() + header_timeout
            self.pool.watch()

    # -- BodyStream --------------------------------------------------------------------------

    def pipe(self, sink: BodySink) -> asyncio.Future[None]:
        done = self._loop.create_future()
        self._done = done
        if self._failure is not None:
            done.set_exception(self._failure)
            return done
        self._sink = sink
        if self._body_chunks:
            for chunk in self._take_held():
                sink.write(chunk)
            if not self._paused_by_sink:
                self._set_reading(True)
        if self._message_done:
            done.set_result(None)
            self._finish()
        elif self._closed:
            done.set_exception(UpstreamUnavailable("upstream closed the connection"))
        else:
            self._last_activity = self._time()
            self._timer = self._loop.call_later(self._body_timeout, self._on_body_timeout)
        return done

    def take_complete_body(self) -> bytes | None:
        """The whole body when it has already arrived (then the connection is released)."""
        if not self._message_done:
            return None
        chunks = self._body_chunks
        if len(chunks) == 1:
            # the common case, the body in one read: no list made, no join
            body = chunks[0]
            chunks.clear()
            self._chunks_len = 0
        else:
            body = b"".join(self._take_held()) if chunks else b""
        self._finish()
        return body

    def pause(self) -> None:
        self._paused_by_sink = True
        self.stalled_since = self._time()
        self._set_reading(False)

    def resume(self) -> None:
        self._paused_by_sink = False
        self.stalled_since = 0.0
        self._set_reading(True)

    def progressing(self) -> None:
        if self._paused_by_sink:
            self.stalled_since = self._time()

    def evict(self) -> None:
        """Take the connection back from a client that stalled (the pool is full and others
        wait): an upload ends with 408, a response being read is cut."""
        if self._status:
            self._fail(UpstreamUnavailable("the client stopped reading while others waited"))
        else:
            self._fail(RequestTimeout("the request body stalled while others waited"))

    def _set_reading(self, on: bool) -> None:
        transport = self.transport
        if transport is None or self._closed or self._read_paused != on:
            return
        self._read_paused = not on
        if on:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def abort(self) -> None:
        self.reusable = False
        self._sink = None
        self._complete(None)  # the client's choice: nothing learned about the upstream
        self.close()
        self._release()

    def _complete(self, outcome: bool | None) -> None:
        completion = self.completion
        if completion is not None:
            self.completion = None
            completion.finish(outcome)

    # -- endings -----------------------------------------------------------------------------

    def _finish(self) -> None:
        self._complete(True)
        self._active = False
        self._sink = None
        self._paused_by_sink = False
        self.stalled_since = 0.0
        self._set_reading(True)
        self.reusable = self._keep_alive and not self._closed
        self._release()

    def _release(self) -> None:
        if self.in_use:
            self.in_use = False
            self.pool.release(self)

    def release_unused(self) -> None:
        """The response head was received but its body is not wanted."""
        if self._message_done:
            self._finish()
        else:
            self.abort()

    def _fail(self, error: GatewayError) -> None:
        self._complete(False)  # a body cut short: a failure of the upstream's
        self._failure = error
        self.deadline = 0.0
        self.reusable = False
        self._keep_alive = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter = self._head_waiter
        self._head_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        done = self._done
        if done is not None and not done.done():
            done.set_exception(error)
            # a failure nobody awaits yet must not be reported as "never retrieved"
            done.add_done_callback(_consume)
        self.close()

    def check_deadline(self, now: float) -> None:
        """Called by the pool a few times a second while this connection is in use."""
        if self.deadline and now >= self.deadline:
            self.deadline = 0.0
            self._fail(UpstreamTimeout("upstream did not answer in time"))

    def _on_body_timeout(self) -> None:
        self._timer = None
        if self._message_done or self._closed:
            return
        idle = self._time() - self._last_activity
        if self._paused_by_sink or idle < self._body_timeout:
            # paused by a slow client (the client side has its own timeout), or still moving
            self._timer = self._loop.call_later(
                max(self._body_timeout - idle, 0.05), self._on_body_timeout
            )
            return
        self._fail(UpstreamTimeout("upstream stalled while sending the body"))

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self._closed:
            self._closed = True
            self.transport.close()

    @property
    def is_closed(self) -> bool:
        return self._closed

    def forward(self, data: bytes) -> None:
        """Tunnel: client bytes to the upstream (dropped once it is gone)."""
        transport = self.transport
        if transport is not None:
            transport.write(data)

    def _tunnel_data(self, data: bytes) -> None:
        """Bytes after a 101: to the client, or held (bounded) until the tunnel is set up."""
        if self.on_upgrade_data is not None:
            self.on_upgrade_data(data)
            return
        self._hold(data)

    def start_tunnel(self, on_data: Callable[[bytes], None], peer: BodyProducer) -> None:
        """After a 101: every byte from the upstream goes to `on_data` (b"" at the end).

        `peer` is the client side, paused while this upstream's write buffer is full.
        """
        self.on_upgrade_data = on_data
        self.tunnel_peer = peer
        self.reusable = False
        if not self._closed:
            self.pool.detach(self)
            self.detached = True
        rest = b"".join(self._take_held())
        if rest:
            on_data(rest)
        if self._closed:
            on_data(b"")  # the upstream hung up before the tunnel was set up
        else:
            self._set_reading(True)


def _consume(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()
