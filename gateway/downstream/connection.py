"""The downstream HTTP/1.1 server protocol: one `HttpConnection` per client connection.

llhttp (via httptools) parses; the callbacks fill a `RequestHead`, normalize the path and pick
the route as soon as the head is complete — so the body limit is the route's before the first
body byte — and queue an `Exchange`.  One task per connection works through the queue in order
(pipelining), runs each route's pipeline, and writes the response: only this class writes to
the client socket, and every `GatewayError` becomes one problem+json response here.  Metrics and
the access log are emitted here too, once per request.

Timeouts cost nothing per request: a connection only records a deadline, and the app's
sweeper looks at every connection a few times a second.  The same look enforces the minimum
data rate both ways (slow clients must not hold upstream connections): a request body arriving
slower than `limits.min_data_rate` fails with 408 (RequestBody.check_rate), and a client that
keeps the gateway waiting with response bytes it does not read — paused longer than the grace
period while having taken less than the minimum rate on average since its request arrived, or
taking nothing for `body_timeout` — is cut.  What a client took is what its kernel acknowledged:
bytes written, less what is still in the transport's buffer and in the socket's send queue
(TIOCOUTQ).  Counting only what left the transport's buffer would not do: the kernel queues
megabytes and frees room in big steps, so a client reading steadily would look stalled for
seconds; and the average runs over the whole response, since TCP windows open in bursts.
"""

from __future__ import annotations

import asyncio
import contextvars
import fcntl
import logging
import struct
import termios
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, cast, final

import httptools

from gateway.core.waiter import Continued, Waiter
from gateway.downstream.redirect_https import ACME_CHALLENGE
from gateway.downstream.tracing import begin_request
from gateway.errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    InternalError,
    PayloadTooLarge,
    RequestTimeout,
    TooManyConnections,
)
from gateway.http.flow import Drain, not_connected
from gateway.http.headers import (
    NOT_NAMED_BY_CONNECTION,
    PARSED_SHIFT,
    READ_AUTHORIZATION,
    READ_CONNECTION,
    READ_CONTENT_LENGTH,
    READ_EXPECT,
    READ_FORWARDED,
    READ_FORWARDED_FOR,
    READ_HOST,
    READ_PROXY_CONNECTION,
    READ_REQUEST_ID,
    READ_TRACEPARENT,
    READ_TRACESTATE,
    READ_TRANSFER_ENCODING,
    READ_UPGRADE,
    RECEIVED_CLASSES,
    connection_tokens,
    received_name_class,
    status_line,
)
from gateway.http.host import normalize_host
from gateway.http.messages import (
    BODY_HIGH_WATER,
    BodyStream,
    RequestBody,
    RequestHead,
    Response,
    Tunnel,
)
from gateway.http.path import PATH_SEMICOLON, split_target
from gateway.http.problem import problem_response
from gateway.identity import real_client
from gateway.observability.instruments import clock
from gateway.observability.request_trace import CURRENT_TRACE, RequestTrace, TraceSlot
from gateway.pipeline import Peer, RequestContext
from gateway.tls import ClientCertificate

if TYPE_CHECKING:
    from gateway.config.model import LimitsConfig as Limits
    from gateway.downstream.serving import ServerState
    from gateway.observability.instruments import CounterChild
    from gateway.runtime.snapshot import Route, Snapshot

log = logging.getLogger("gateway.http")

_IDLE: Final = 1
_HEAD: Final = 2
_LINGER: Final = 3
#: refused over limits.max_connections / max_connections_per_client, not yet answered
_REFUSED_FULL: Final = 4
_REFUSED_CLIENT: Final = 5

#: pipelined requests parsed ahead of the one being answered before the socket is paused
_MAX_QUEUED: Final = 8
_LINGER_SECONDS: Final = 2.0
#: refused connections of one listener waiting to send their request and read the 503; past
#: this many, a refused connection is closed at once (a flood must cost no more than that)
_MAX_REFUSING: Final = 64
#: how long a refused connection has to send its request and read the answer
_REFUSAL_SECONDS: Final = 2.0
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

_NO_BODY_STATUS: Final = frozenset({204, 304})
#: before connection_made
_NO_PEER: Final = Peer("", trusted=False, scheme="http", listener="")


class ClientClosed(Exception):
    """The client went away before its response was written."""


@final
class Exchange:
    """One request on its way through the connection's queue."""

    __slots__ = ("body", "close", "error", "head", "measured_from", "route", "snapshot", "start")

    def __init__(
        self,
        head: RequestHead,
        snapshot: Snapshot,
        start: float,
        route: Route | None,
        error: GatewayError | None,
        body: RequestBody | None,
    ) -> None:
        self.head = head
        self.snapshot = snapshot
        #: loop time at the head: what the request's deadlines count from
        self.start = start
        #: instruments.clock() at the head: what its reported duration counts from (uvloop's
        #: loop time ticks in whole milliseconds, too coarse for a request that takes 300 µs)
        self.measured_from = clock()
        self.route = route
        self.error = error
        self.body = body
        self.close = error is not None and error.close


@final
class HttpConnection(asyncio.Protocol):
    __slots__ = (
        "_acked_seen",
        "_bytes_out",
        "_chunk_raw",
        "_chunked_out",
        "_closing",
        "_context",
        "_coro",
        "_counted_client",
        "_current",
        "_drain",
        "_ended_at",
        "_enter",
        "_feed",
        "_final_sent",
        "_head",
        "_head_bytes",
        "_host_forwarded",
        "_host_name",
        "_host_raw",
        "_in_head",
        "_keeps_alive",
        "_loop",
        "_method",
        "_progress_at",
        "_queue",
        "_rate_base",
        "_rate_since",
        "_raw_head",
        "_reading_paused",
        "_ready",
        "_refusal_timer",
        "_resume",
        "_sampled_at",
        "_send",
        "_send_bytes",
        "_sent_before",
        "_start",
        "_stopped",
        "_stream",
        "_task",
        "_time",
        "_trace_slot",
        "_tunnel",
        "_tunnel_active_at",
        "_tunnel_bytes",
        "_tunnel_seen",
        "_upgrading",
        "_waiting",
        "_wake",
        "_wake_later",
        "_wakeup",
        "_write_paused",
        "_write_paused_at",
        "deadline",
        "deadline_kind",
        "parser",
        "peer",
        "server",
        "transport",
    )

    def __init__(self, server: ServerState) -> None:
        self.server = server
        self._loop = server.loop
        self._time = server.loop_time
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        #: the parser's methods every request calls, bound once per parser (a method looked up
        #: per call costs ~100 instructions, callgrind): set wherever `parser` is
        self._feed = self.parser.feed_data
        self._keeps_alive = self.parser.should_keep_alive
        self._method = self.parser.get_method
        #: `transport.write`, bound once the transport is known (a response's head is one call)
        self._send_bytes: Callable[[bytes], object] = not_connected
        self.peer = _NO_PEER
        self.deadline = 0.0
        self.deadline_kind = 0
        self._head: RequestHead | None = None
        self._head_bytes = 0
        #: the last Host this connection sent, and its normalized forms: a keep-alive client
        #: repeats it, and comparing bytes costs less than the normalizer's cache lookup
        self._host_raw = b""
        self._host_forwarded = b""
        self._host_name = ""
        self._raw_head = 0
        self._in_head = False
        self._current: Exchange | None = None
        self._queue: deque[Exchange] = deque()
        #: `_process`, run by this connection's callbacks (see gateway.core.waiter) while it
        #: waits only on `Waiter`s; handed to `_task` when it awaits anything else
        self._coro: Coroutine[Any, None, None] | None = None
        #: the Waiter the driven `_process` awaits
        self._waiting: Waiter[Any] | None = None
        #: `_process` is to be started, or `_wake` woken, once the parser is out of the way
        self._start = False
        self._wake: Waiter[None] | None = None
        #: the bound `_step`, made once, and what a Waiter calls to have it run on the loop's
        #: next turn with the listener's other wake-ups (core.waiter.ReadySteps)
        self._resume = self._step
        self._ready = server.ready
        self._wake_later = self._queue_step
        #: the context `_process` runs in, driven or in `_task`, and its `run` (bound once, as
        #: is `_send`: each is a method object a step would otherwise make)
        self._context = context = contextvars.copy_context()
        self._enter = context.run
        self._send: Callable[[None], object] | None = None
        self._task: asyncio.Task[None] | None = None
        #: the trace slot in `_context` (made by its first traced request)
        self._trace_slot: TraceSlot | None = None
        self._wakeup: Waiter[None] | None = None
        self._closing = False
        self._stopped = False  # no more requests are parsed on this connection
        self._reading_paused = False
        self._write_paused = False
        self._write_paused_at = 0.0
        #: a response waiting for the client to read what it was sent (flow control)
        self._drain = Drain(self._loop)
        self._stream: BodyStream | None = None
        self._chunked_out = False
        self._bytes_out = 0
        #: raw bytes read inside the current chunked body (see `_count_framing`)
        self._chunk_raw = 0
        #: bytes written on this connection before the current response (plus `_bytes_out`:
        #: everything written), and the marks that measure a slow reader while writes are paused
        self._sent_before = 0
        #: where the current (or last) response began: bytes written before it, and when its
        #: request arrived — a slow reader's average rate is measured from there
        self._rate_base = 0
        self._rate_since = 0.0
        self._acked_seen = 0
        self._progress_at = 0.0
        #: when `_acked_seen` was last compared with what the kernel says
        self._sampled_at = 0.0
        #: counted in `client_connections` (an untrusted peer while a per-client limit is set)
        self._counted_client = False
        #: over a connection limit, being answered 503: the timer that ends it (and while it is
        #: set, the connection is counted in the listener's `refusing`)
        self._refusal_timer: asyncio.TimerHandle | None = None
        self._ended_at = 0.0
        #: a response with Connection: close went out: no request after it is answered
        self._final_sent = False
        self._tunnel: Tunnel | None = None
        #: bytes through the tunnel either way, the count at the sweeper's last look, and when
        #: it last moved (tunnel_idle_timeout)
        self._tunnel_bytes = 0
        self._tunnel_seen = 0
        self._tunnel_active_at = 0.0
        #: an upgrade request between its head and llhttp's HttpParserUpgrade
        self._upgrading: Exchange | None = None

    # -- connection life ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its interface
        self.transport = cast(asyncio.Transport, transport)
        self._send_bytes = self.transport.write
        server = self.server
        snapshot = server.snapshot
        limits = snapshot.limits
        # while draining too: a connection the kernel accepted before the listener closed is
        # served (its answer says Connection: close), never reset
        if len(server.connections) >= limits.max_connections:
            self._refuse(server.refused_full)
            return
        address = transport.get_extra_info("peername")
        ip = address[0] if address else ""
        trusted = snapshot.is_trusted(ip)
        per_client = limits.max_connections_per_client
        if per_client and not trusted:
            # one address must not take every connection (and through them the upstream pools)
            held = server.client_connections.get(ip, 0)
            if held >= per_client:
                self._refuse(server.refused_per_client)
                return
            server.client_connections[ip] = held + 1
            self._counted_client = True
        server.connections.add(self)
        server.connections_gauge.inc()
        self.peer = peer = Peer(
            ip,
            trusted=trusted,
            scheme=server.scheme,
            listener=server.listener,
        )
        if server.tls:
            sslobj = transport.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            if der:
                # verified at the handshake against the listener's client_ca; parsed once here
                peer.client_cert = cert = ClientCertificate.from_der(der)
                peer.client_sans = cert.san_values
        # the first request head must arrive within header_timeout of the connection opening
        self.deadline = self._time() + server.snapshot.limits.header_timeout
        self.deadline_kind = _HEAD

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return
        server = self.server
        timer = self._refusal_timer
        if timer is not None:
            # cancelled, so that a burst of refusals answered at once holds nothing for seconds
            self._refusal_timer = None
            timer.cancel()
            server.refusing -= 1
        if self in server.connections:
            server.connections.discard(self)
            server.connections_gauge.dec()
        if self._counted_client:
            self._counted_client = False
            clients = server.client_connections
            left = clients.get(self.peer.ip, 1) - 1
            if left > 0:
                clients[self.peer.ip] = left
            else:
                clients.pop(self.peer.ip, None)
        self._closing = True
        self._stopped = True
        if self._stream is not None:
            self._stream.abort()
            self._stream = None
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None
        if self._current is not None and self._current.body is not None:
            self._current.body.fail(BadRequest("client closed the connection"))
        if self._task is not None and not self._task.done():
            self._task.cancel()
        elif self._waiting is not None:
            self._waiting.cancel()  # the driven `_process` unwinds on the loop's next turn
        self._drain.fail(ClientClosed())
        server.on_connection_closed()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._write_paused_at = now = self._time()
        transport = self.transport
        if transport is not None:
            self._acked_seen = self._acked(transport)
        self._progress_at = self._sampled_at = now
        if self._stream is not None:
            self._stream.pause()
        elif self._tunnel is not None:
            self._tunnel.pause()  # the client reads the tunnel slowly: stop reading upstream

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._stream is not None:
            self._stream.resume()
        elif self._tunnel is not None:
            self._tunnel.resume()
        self._drain.release()

    # RequestBody's producer: flow control of the client socket
    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self._closing:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self._closing:
            self._reading_paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self._received(data)
        if self._start or self._wake is not None:
            self._run_queue()

    def _received(self, data: bytes) -> None:
        tunnel = self._tunnel
        if tunnel is not None:
            self._tunnel_bytes += len(data)
            tunnel.forward(data)
            return
        if self._stopped:
            if self.deadline_kind >= _REFUSED_FULL:
                self._answer_refusal()
            return  # after a fatal error, refused or while lingering: discard
        was_in_head = self._in_head
        current = self._current
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade as exc:
            self._on_upgrade(data[exc.args[0] :])
        except httptools.HttpParserCallbackError as exc:
            error = exc.__context__
            if isinstance(error, _StopParsing):
                self._stopped = True  # nothing after this point is a request
                return
            self._parse_failed(
                error if isinstance(error, GatewayError) else BadRequest("malformed request")
            )
        except httptools.HttpParserError as exc:
            self._parse_failed(BadRequest(f"malformed request: {exc}"))
        else:
            if self._in_head and not self._stopped:
                limits = self.server.snapshot.limits
                if not was_in_head and not self._queue:
                    # a new head began and did not end: it must end within header_timeout
                    self.deadline = self._time() + limits.header_timeout
                    self.deadline_kind = _HEAD
                # llhttp buffers a header until it ends: bound what a never-ending one costs
                self._raw_head = self._raw_head + len(data) if was_in_head else len(data)
                if self._raw_head > limits.max_header_bytes + 65536:
                    self._parse_failed(HeadersTooLarge("request head too large"))
            elif current is not None and current is self._current and current.head.chunked:
                self._count_framing(current, len(data))

    def _count_framing(self, current: Exchange, size: int) -> None:
        """Bound what a chunked body costs beyond its bytes: chunk framing and trailers.

        llhttp buffers a trailer until it ends (httptools grows it by concatenation: quadratic
        time), and a body in one-byte chunks costs a callback per byte; so what is not body may
        be at most `max_header_bytes` more than the body itself.  Counted only for reads that
        began and ended inside this body, so the figure never includes another request.
        """
        body = current.body
        if body is None:
            return
        self._chunk_raw += size
        if self._chunk_raw - 2 * body.received > self.server.snapshot.limits.max_header_bytes:
            self._parse_failed(
                BadRequest("chunk framing and trailers outweigh the body (max_header_bytes)")
            )

    def eof_received(self) -> bool | None:
        if self.deadline_kind == _LINGER:
            return None  # the client is done: close now
        current = self._current
        if current is not None and current.body is not None:
            # the body being read can never end now: fail it at once, rather than holding an
            # upstream connection until body_timeout
            current.body.fail(BadRequest("the client closed its side before the body ended"))
            self._current = None
        if self._queue:
            # half-close: the client may still read what it asked for
            self._stopped = True
            return True
        return None

    # -- llhttp callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._stopped:
            # llhttp goes on through the rest of a buffer after a request that ends the
            # connection (an error answered without reading its body, Connection: close):
            # nothing after it is a request (RFC 9112 §9.6), however it arrived
            raise _StopParsing()
        self._head = RequestHead()
        self._head_bytes = 0
        self._raw_head = 0
        self._in_head = True
        # a head that arrives whole is queued before any deadline could matter; one still
        # incomplete when feed_data returns gets its header_timeout there

    def on_url(self, url: bytes) -> None:
        head = self._head
        assert head is not None
        head.target += url
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer: never merged into headers, never forwarded
        head = self._head
        assert head is not None
        self._head_bytes += len(name) + len(value) + 4
        head.headers.append((name, value))
        # one lookup, by the name as spelled, classes it for the way upstream and says which
        # of the names read here it is (none is lowered)
        flags = RECEIVED_CLASSES.get(name)
        if flags is None:
            flags = received_name_class(name)
        head.classes.append(flags)
        read = flags >> PARSED_SHIFT
        if read == 0:
            return
        if read == READ_HOST:
            if head.host is not None:
                raise BadRequest("more than one Host header")
            head.host = value
        elif read == READ_CONTENT_LENGTH:
            head.content_length = int(value)
        elif read == READ_TRANSFER_ENCODING:
            if value.strip().lower() != b"chunked":
                raise BadRequest("only Transfer-Encoding: chunked is accepted")
            head.chunked = True
        elif read == READ_CONNECTION:
            tokens = connection_tokens(value)
            head.connection_tokens = (
                tokens if head.connection_tokens is None else head.connection_tokens | tokens
            )
        elif read == READ_PROXY_CONNECTION:
            # llhttp reads it like Connection when it decides keep-alive: see the version in
            # on_headers_complete
            head.proxy_connection = True
        elif read == READ_EXPECT:
            if value.strip().lower() == b"100-continue":
                head.expect_continue = True
        elif read == READ_UPGRADE:
            if head.upgrade is not None:
                # which one would be tunnelled? the first here, perhaps the last upstream
                raise BadRequest("more than one Upgrade header")
            head.upgrade = value
        elif read == READ_REQUEST_ID:
            head.request_id = value
        elif read == READ_FORWARDED_FOR:
            previous = head.x_forwarded_for
            head.x_forwarded_for = value if previous is None else previous + b", " + value
        elif read == READ_FORWARDED:
            previous = head.forwarded
            head.forwarded = value if previous is None else previous + b", " + value
        elif read == READ_AUTHORIZATION:
            # the jwt stage and the upstream could each believe a different copy
            if head.authorization is not None:
                raise BadRequest("more than one Authorization header")
            # kept for the jwt stage, which would otherwise scan every header for it
            head.authorization = value
        elif read == READ_TRACEPARENT:
            # a second one makes it ambiguous: a new trace (never an error: W3C Trace Context)
            head.traceparent = value if head.traceparent is None else b""
        elif read == READ_TRACESTATE:
            previous = head.tracestate
            head.tracestate = value if previous is None else previous + b"," + value

    def on_headers_complete(self) -> None:
        head = self._head
        assert head is not None
        self._in_head = False
        self._raw_head = 0
        server = self.server
        snapshot = server.snapshot
        limits = snapshot.limits
        if self._head_bytes > limits.max_header_bytes:
            raise HeadersTooLarge(f"request head exceeds {limits.max_header_bytes} bytes")
        parser = self.parser
        keep_alive = self._keeps_alive()
        if keep_alive and head.connection_tokens is None and not head.proxy_connection:
            # llhttp keeps a connection alive by default only for HTTP/1.1: an HTTP/1.0, 0.9
            # or 2.0 one needs a Connection or Proxy-Connection header naming keep-alive.
            # With neither header, keep-alive means HTTP/1.1, and the version string — a
            # format() of two ints inside httptools, ~2k instructions — is not made.
            version = "1.1"
        else:
            version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise BadRequest(f"HTTP/{version} is not supported")
        head.version = version
        raw_method = self._method()
        method = raw_method.decode("ascii")
        if method == "CONNECT":
            raise BadRequest("CONNECT is not supported")
        head.method = method
        head.raw_method = raw_method
        if version == "1.1":
            if head.host is None:
                raise BadRequest("missing Host header")
        elif head.chunked:
            raise BadRequest("Transfer-Encoding is not allowed in HTTP/1.0")
        head.keep_alive = keep_alive
        tokens = head.connection_tokens
        if tokens is not None:
            named = tokens - NOT_NAMED_BY_CONNECTION
            if named:
                # hop-by-hop by the client's word: gone on arrival, before any stage runs, so
                # that naming a header can never remove one a stage sets for the upstream
                # (Connection: authorization takes the token away: replace_headers forgets it)
                head.replace_headers([(n, v) for n, v in head.headers if n.lower() not in named])
        head.path, head.query, head.plain_target, head.path_flags = split_target(head.target)
        raw_host = head.host
        if raw_host is not None:
            # once, before routing, forwarding and anything else that looks at the host
            if raw_host == self._host_raw:
                head.host = self._host_forwarded
                head.host_name = self._host_name
            else:
                head.host, head.host_name = forwarded, name = normalize_host(raw_host)
                self._host_raw = raw_host
                self._host_forwarded = forwarded
                self._host_name = name
        now = self._time()
        error: GatewayError | None = None
        route: Route | None = server.https_redirect
        if route is None or head.path.startswith(ACME_CHALLENGE):
            # (a redirect_https listener's route answers the rest: 308 to https)
            try:
                route = snapshot.router.match(head.host_name, head.path, method, head)
            except GatewayError as exc:
                route = None
                error = exc
        if route is not None and (head.path_flags or route.reject_underscores):
            error = _refused_by_route(head, route)
        has_body = head.chunked or bool(head.content_length)
        upgrade = head.upgrade is not None and parser.should_upgrade()
        if upgrade:
            error = self._decide_upgrade(head, route, error, has_body)
        elif head.upgrade is not None:
            head.upgrade = None  # no "Connection: upgrade": an ordinary request
        body: RequestBody | None = None
        self._chunk_raw = 0
        if has_body:
            limit = limits.max_body_bytes
            if route is not None and route.max_body_bytes is not None:
                limit = route.max_body_bytes
            if head.content_length is not None and head.content_length > limit:
                error = PayloadTooLarge(f"request body exceeds {limit} bytes")
            high_water = BODY_HIGH_WATER
            if route is not None and route.request_buffering >= high_water:
                high_water = route.request_buffering + 1  # a body buffered whole fits
            body = RequestBody(self._loop, self, limit, limits.body_timeout, high_water)
            if head.expect_continue and error is None:
                body.on_first_read = self._send_continue
        exchange = Exchange(head, snapshot, now, route, error, body)
        server.in_flight_gauge.inc()
        self._current = exchange
        self._enqueue(exchange)
        if exchange.close:
            # answered without reading the body: nothing after this head is parsed
            self._stopped = True
            self._current = None
        elif upgrade:
            # llhttp ends the message at the head of any upgrade request and raises
            # HttpParserUpgrade: `_on_upgrade` takes it from there
            self._upgrading = exchange
            if body is not None:
                self._current = None  # the "message complete" llhttp reports is not the body's

    def _decide_upgrade(
        self, head: RequestHead, route: Route | None, error: GatewayError | None, has_body: bool
    ) -> GatewayError | None:
        """An upgrade request (llhttp saw Upgrade and Connection: upgrade): tunnel it, or make
        it an ordinary request whose body is read as declared.  Returns the request's error."""
        protocol = head.upgrade
        assert protocol is not None
        protocol = protocol.strip(b" \t")
        # a WebSocket handshake is an HTTP/1.1 GET (RFC 6455 §4.1), and Upgrade means nothing
        # in HTTP/1.0 (RFC 9110 §7.8): anything else is an ordinary request
        tunnel = (
            error is None
            and route is not None
            and route.websocket
            and head.version == "1.1"
            and head.method == "GET"
            and protocol.lower() == b"websocket"
        )
        if not tunnel:
            head.upgrade = None  # never forwarded; the connection stays HTTP/1.1
            if has_body:
                # its body is framed by a parser of its own, then the connection closes
                head.keep_alive = False
            return error
        if has_body:
            # RFC 6455 §4.1: the handshake is a GET without a body; bytes after the head
            # would be either a body or the new protocol, and the peers could disagree
            head.upgrade = None
            return BadRequest("a WebSocket handshake cannot have a body")
        head.upgrade = protocol  # what the upstream is asked for, spelled one way
        return None

    def on_body(self, data: bytes) -> None:
        exchange = self._current
        if exchange is not None and exchange.body is not None:
            exchange.body.feed(data)

    def on_message_complete(self) -> None:
        exchange = self._current
        if exchange is not None:
            self._current = None
            if exchange.body is not None:
                exchange.body.feed_eof()

    # -- parse failures and upgrades ---------------------------------------------------------

    def _parse_failed(self, error: GatewayError) -> None:
        """A request we cannot parse: answer it after those before it, then close."""
        self._stopped = True
        current = self._current
        self._current = None
        if current is not None:
            # its head is queued already: failing its body makes its handler answer 400
            current.close = True
            if current.body is not None:
                current.body.fail(error)
            return
        head = self._head if self._head is not None and self._in_head else RequestHead()
        self._in_head = False
        exchange = Exchange(head, self.server.snapshot, self._time(), None, error, None)
        exchange.close = True
        self.server.in_flight_gauge.inc()
        self._enqueue(exchange)

    def _on_upgrade(self, rest: bytes) -> None:
        """llhttp stopped at the head of an upgrade request; `rest` is what followed it.

        Whatever follows is never parsed as a request of its own unless the head declared no
        body: it is the tunnel's first bytes, or the body as declared, or (after a body-less
        request whose upgrade was ignored) the next pipelined request.
        """
        exchange = self._upgrading
        self._upgrading = None
        if exchange is None:
            if self._stopped:
                return  # refused on its head (and answered without its body): nothing more
            # on_headers_complete records every other one; anything else is a parser we do not
            # know
            self._parse_failed(BadRequest("malformed request"))
            return
        if exchange.head.upgrade is not None:
            # tunnelled: nothing more is parsed; bytes that came early wait for the 101
            self._stopped = True
            if rest:
                # never among the headers: it would be written into the upstream request head
                exchange.head.early_data += rest
            return
        if self._stopped:
            return  # refused without reading its body: the connection closes after the answer
        if exchange.body is not None:
            # not tunnelled, with a body: llhttp skipped it, so a parser that knows only this
            # body's framing reads it, and stops there (the connection then closes)
            self._current = exchange
            self.parser = _body_parser(self, exchange.head)
        else:
            # not tunnelled, no body: Upgrade was ignored and the connection stays HTTP/1.1
            self.parser = httptools.HttpRequestParser(self)
        self._feed = self.parser.feed_data
        self._keeps_alive = self.parser.should_keep_alive
        self._method = self.parser.get_method
        if rest:
            self._received(rest)

    # -- the request queue -------------------------------------------------------------------

    def _enqueue(self, exchange: Exchange) -> None:
        """Queue a request for `_process`, which `_run_queue` starts or wakes once llhttp has
        returned (never from inside its callbacks)."""
        self._queue.append(exchange)
        if self._coro is None and self._task is None:
            self.deadline_kind = 0
            self._start = True
            return
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            self.deadline_kind = 0
            wakeup.settle(None)
            self._wake = wakeup
        elif len(self._queue) > _MAX_QUEUED:
            self.pause_reading()

    def _run_queue(self) -> None:
        """Start `_process`, or wake it, for the requests `_enqueue` queued: it runs on the
        loop's next turn, with the listener's other wake-ups (core.waiter.ReadySteps)."""
        if self._start:
            self._start = False
            self._coro = coro = self._process()
            self._send = coro.send
            self._ready.add(self._resume)
            return
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.wake()

    def _queue_step(self) -> None:
        self._ready.add(self._resume)

    def _step(self) -> None:
        """Run the driven `_process` until it waits again (gateway.core.waiter); called by the
        listener's ReadySteps (and by `abort`).

        It goes on here while it awaits `Waiter`s; anything else it awaits (a body's bytes, a
        new upstream connection, a drain) hands the rest of it to a task.
        """
        coro = self._coro
        send = self._send
        if coro is None or send is None:
            return
        waiting = self._waiting
        if waiting is not None:
            if not waiting.done():
                return  # a stale wake-up (the cancel of a wait that was woken already)
            self._waiting = None
        try:
            pending = self._enter(send, None)
        except StopIteration:
            self._coro = self._send = None
            return
        except Exception:
            # what a task would have kept as its exception: never into the callback that woke it
            self._coro = self._send = None
            log.exception("answering on a connection from %s failed", self.peer.ip)
            return
        if type(pending) is Waiter:
            waiter = pending
            waiter._asyncio_future_blocking = False
            waiter.driver = self._wake_later
            self._waiting = waiter
            return
        self._coro = self._send = None
        self._task = self._loop.create_task(
            cast(Coroutine[Any, None, None], Continued(coro, pending)), context=self._context
        )

    async def _process(self) -> None:
        """Answers queued requests in order, then waits for more: run by the connection's own
        callbacks while it waits on `Waiter`s, in a task once it awaits anything else.

        Kept across keep-alive requests: each wait costs one `Waiter`, not a coroutine.
        """
        queue = self._queue
        try:
            while True:
                while queue:
                    if self._closing:
                        # the connection was closed or aborted while this request waited for its
                        # turn (a driven `_process` starts on the loop's next turn): not run
                        return
                    try:
                        await self._run(queue[0])
                    finally:
                        # answered or abandoned: `_run` counted it out of the gauge either way
                        queue.popleft()
                    if self._closing or self._final_sent:
                        # requests pipelined behind one answered with Connection: close are
                        # never run: the client may send them again elsewhere (RFC 9112 §9.6)
                        return
                    if self._reading_paused and len(queue) <= _MAX_QUEUED // 2:
                        self.resume_reading()
                    if self._write_paused:
                        # the client is not reading: answer nothing more until it does
                        await self._drain.wait()
                        self._ended_at = self._time()
                if not self._wait_for_next():
                    return
                if self._coro is None:
                    # run by a task (it awaited something else): it ends here, and the next
                    # request starts a driven `_process` again
                    return
                wakeup: Waiter[None] = Waiter(self._loop)
                self._wakeup = wakeup
                await wakeup
        except (asyncio.CancelledError, ClientClosed):
            pass
        finally:
            self._task = None
            self._wakeup = None
            for pending in queue:
                if pending.body is not None:
                    pending.body.fail(BadRequest("connection closed"))
                self.server.in_flight_gauge.dec()
            queue.clear()

    def _wait_for_next(self) -> bool:
        """Between requests: arm the right deadline; False when the connection is done."""
        if self._closing or self.transport is None or self._tunnel is not None:
            return False
        if self._stopped:
            self._close_transport()
            return False
        # the clock as the last response ended: close enough, and one call fewer per request
        now = self._ended_at
        if self._in_head:
            self.deadline = now + self.server.snapshot.limits.header_timeout
            self.deadline_kind = _HEAD
            return True
        if self.server.draining and self._close_idle():
            return False
        self.deadline = now + self.server.snapshot.limits.idle_timeout
        self.deadline_kind = _IDLE
        return True

    async def _run(self, exchange: Exchange) -> None:
        server = self.server
        head = exchange.head
        request_id = head.request_id
        peer = self.peer
        if request_id is None or not peer.trusted or not _valid_request_id(request_id):
            request_id = server.request_ids.new()
        ctx: RequestContext | None = None
        trace: RequestTrace | None = None
        status = 0
        try:
            error = exchange.error
            route = exchange.route
            if error is None and route is not None:
                tracer = exchange.snapshot.tracer
                if tracer is not None:
                    slot = self._trace_slot
                    if slot is None:
                        # this runs in the connection's `_context`, which keeps the slot
                        slot = self._trace_slot = TraceSlot()
                        CURRENT_TRACE.set(slot)
                    trace = slot.trace = begin_request(tracer, head, route, peer, slot)
                ctx = RequestContext(
                    head,
                    exchange.body,
                    route,
                    exchange.snapshot,
                    peer,
                    request_id,
                    exchange.start,
                    trace,
                )
                try:
                    response = await route.handler(ctx)
                    edit = ctx.edit  # the route's first stage left its response edit here
                    if edit is not None:
                        response = edit.edited(response)
                except GatewayError as exc:
                    edit = ctx.edit
                    if edit is not None:
                        edit.refused(exc)
                    response = problem_response(exc, request_id)
                    if exc.close:
                        exchange.close = True
                except Exception:
                    log.exception("unhandled error on route %s", route.name)
                    response = problem_response(InternalError("internal error"), request_id)
            else:
                if error is None:
                    error = BadRequest("no route")
                response = problem_response(error, request_id)
            status = response.status
            piping = self._respond(exchange, response, request_id)
            if piping is not None:
                await piping
        except asyncio.CancelledError:
            status = status or 499  # the client closed the request
            raise
        except ClientClosed:
            status = status or 499
            raise
        finally:
            server.in_flight_gauge.dec()
            self._ended_at = self._time()
            # the client the stages judged: behind trusted proxies an X-Forwarded-For hop
            forwarded = head.x_forwarded_for
            client = (
                peer.ip
                if forwarded is None or not peer.trusted
                else real_client(peer, forwarded, exchange.snapshot)
            )
            server.record(
                exchange, ctx, status or 499, request_id, self._bytes_out, client, peer.ip
            )
            self._sent_before += self._bytes_out
            self._bytes_out = 0
            if trace is not None:
                slot = self._trace_slot
                if slot is not None:
                    slot.trace = None

    def _respond(
        self, exchange: Exchange, response: Response, request_id: bytes
    ) -> Coroutine[Any, Any, None] | None:
        """Write the response's head (and its body when it has one in hand); a streamed body
        is the coroutine returned, to await.  Not a coroutine itself: most responses are
        written whole at once, and a coroutine frame costs a request ~1k instructions."""
        transport = self.transport
        assert transport is not None
        self._rate_base = self._sent_before
        self._rate_since = exchange.start
        head = exchange.head
        body = exchange.body
        status = response.status
        tunnel = response.tunnel if status == 101 else None
        keep_alive = (
            head.keep_alive
            and not exchange.close
            and not self.server.draining
            and tunnel is None
            and (body is None or body.eof)
        )
        no_body = head.method == "HEAD" or status in _NO_BODY_STATUS or status < 200
        stream = response.stream
        # bytes %-formatting with %b/%d compiles to one sized copy: cheaper than joining a list
        headers = response.headers
        block = b"".join([b"%b: %b\r\n" % (n, v) for n, v in headers]) if headers else b""
        chunked = False
        if tunnel is not None:
            framing = b"Connection: Upgrade\r\n"
        elif no_body:
            framing = b""
        elif stream is None:
            framing = b"Content-Length: %d\r\n" % len(response.body)
        elif stream.length is not None:
            framing = b"Content-Length: %d\r\n" % stream.length
        elif head.version == "1.1":
            framing = b"Transfer-Encoding: chunked\r\n"
            chunked = True
        else:
            framing = b""
            keep_alive = False  # HTTP/1.0 and no length: the body ends when we close
        if tunnel is not None or (keep_alive and head.version == "1.1"):
            connection = b""
        elif keep_alive:
            connection = b"Connection: keep-alive\r\n"
        else:
            connection = b"Connection: close\r\n"
        status_bytes = status_line(status, response.reason)
        if tunnel is not None:
            data = b"%b%bX-Request-Id: %b\r\n%b\r\n" % (status_bytes, block, request_id, framing)
            self._bytes_out += len(data)
            transport.write(data)
            self._start_tunnel(exchange, tunnel)
            return None
        if stream is None or no_body:
            data = b"%b%bX-Request-Id: %b\r\n%b%b\r\n%b" % (
                status_bytes,
                block,
                request_id,
                framing,
                connection,
                b"" if no_body else response.body,
            )
            self._bytes_out += len(data)
            self._send_bytes(data)
            if stream is not None:
                # HEAD / 204 / 304: a body was announced, none follows
                stream.release_unused()
            self._responded(exchange, keep_alive)
            return None
        data = b"%b%bX-Request-Id: %b\r\n%b%b\r\n" % (
            status_bytes,
            block,
            request_id,
            framing,
            connection,
        )
        self._bytes_out += len(data)
        self._send_bytes(data)
        self._chunked_out = chunked
        self._stream = stream
        if self._write_paused:
            stream.pause()
        return self._pipe_body(exchange, stream, chunked, keep_alive)

    async def _pipe_body(
        self, exchange: Exchange, stream: BodyStream, chunked: bool, keep_alive: bool
    ) -> None:
        """A streamed response body, after its head (`_respond`)."""
        transport = self.transport
        assert transport is not None
        try:
            await stream.pipe(self)
        except GatewayError:
            # the head is out: the only honest signal left is to cut the connection — with
            # a reset, so that even a close-delimited body is seen as broken, and so that
            # what is still buffered for a client that reads slowly is freed now
            self._stream = None
            self._closing = True
            transport.abort()
            raise ClientClosed() from None
        finally:
            self._stream = None
        if chunked:
            transport.write(b"0\r\n\r\n")
            self._bytes_out += 5
        self._responded(exchange, keep_alive)

    def _responded(self, exchange: Exchange, keep_alive: bool) -> None:
        """The response is out: a connection not kept alive stops here."""
        if not keep_alive:
            self._stopped = True
            self._final_sent = True
            body = exchange.body
            if body is not None and not body.eof:
                self._linger()
            else:
                self._close_transport()

    def write(self, data: bytes) -> None:
        """BodySink: one chunk of a streamed response body."""
        transport = self.transport
        if transport is None or self._closing:
            return
        self._bytes_out += len(data)
        if self._chunked_out:
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            transport.write(data)

    def _send_continue(self) -> None:
        if self.transport is not None and not self._closing:
            self.transport.write(_CONTINUE)

    # -- tunnels -----------------------------------------------------------------------------

    def _start_tunnel(self, exchange: Exchange, upstream: Tunnel) -> None:
        transport = self.transport
        assert transport is not None
        self._tunnel = upstream
        early = exchange.head.early_data
        if early:
            upstream.forward(early)
        self.deadline_kind = 0

        self._tunnel_active_at = self._time()

        def to_client(data: bytes) -> None:
            if data:
                self._tunnel_bytes += len(data)
                transport.write(data)
            else:
                self._close_transport()

        upstream.start_tunnel(to_client, self)
        if self._reading_paused:
            self.resume_reading()

    # -- endings -----------------------------------------------------------------------------

    def _close_transport(self) -> None:
        if self.transport is not None and not self._closing:
            self._closing = True
            self.transport.close()

    def _linger(self) -> None:
        """Close after an answer that left request bytes unread, without losing the answer.

        Closing a socket with unread input makes the kernel send a reset, which can destroy the
        response before the client reads it; so the write side is shut first and the rest of
        the request is read and dropped for a short while (nginx's lingering close).
        """
        transport = self.transport
        if transport is None or self._closing:
            return
        self._stopped = True
        if transport.can_write_eof():
            transport.write_eof()
            self.deadline = self._time() + _LINGER_SECONDS
            self.deadline_kind = _LINGER
            if self._reading_paused:
                self._reading_paused = False
                transport.resume_reading()
        else:
            self._close_transport()

    def abort(self) -> asyncio.Task[None] | None:
        """Drop the connection now; the task still answering on it, if any (a driven
        `_process` is cancelled and unwinds here, unless it hands its unwinding to a task)."""
        if self.transport is not None:
            self._closing = True  # what is queued is not run (`_process`)
            self.transport.abort()
        waiting = self._waiting
        if waiting is not None and self._coro is not None:
            waiting.cancel()
            self._step()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        return task

    def _acked(self, transport: asyncio.Transport) -> int:
        """Bytes of this connection's responses the client's kernel has acknowledged."""
        written = self._sent_before + self._bytes_out - transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        if sock is None:
            return written
        try:
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return written
        return written - int(struct.unpack("i", queued)[0])

    def _is_slow_reader(self, now: float, transport: asyncio.Transport, limits: Limits) -> bool:
        """Writes are paused: has the client taken nothing for `body_timeout`, or less than the
        minimum rate on average since its request arrived, past the grace period?  A client
        that took at least the minimum rate since the last look is reported to the stream as
        progressing, so its upstream connection is not taken back for a waiting request (the
        average would let a large first TCP window hide a stall for seconds)."""
        if self._tunnel is not None:
            # tunnel bytes are not counted in `_bytes_out`: only the gap applies
            return now - self._write_paused_at > limits.body_timeout
        acked = self._acked(transport)
        rate = limits.min_data_rate
        keeping_up = acked - self._rate_base >= rate * (now - self._rate_since)
        if acked > self._acked_seen:
            recent = acked - self._acked_seen >= rate * (now - self._sampled_at)
            if recent and self._stream is not None:
                self._stream.progressing()
            self._acked_seen = acked
            self._progress_at = now
        elif now - self._progress_at > limits.body_timeout:
            return True
        self._sampled_at = now
        return (
            rate > 0 and not keeping_up and now - self._write_paused_at > limits.min_data_rate_grace
        )

    def close_if_idle(self) -> None:
        """Draining: an idle keep-alive connection closes now (`_close_idle`).

        A busy one closes after its response, which says Connection: close.  One that has not
        sent its first request yet keeps its header_timeout: its client connected to send one
        (perhaps it is a connection the listener accepted as it closed), and it is answered.
        """
        if self._queue or self._in_head or self._tunnel is not None or self._ended_at == 0.0:
            return
        if self.transport is None or self._closing or self._stopped:
            return  # closing or lingering already
        self._close_idle()

    def _close_idle(self) -> bool:
        """Draining, between requests: half-close unless a request is arriving; True if closed.

        A request already in the socket's receive queue is read and answered (with Connection:
        close).  Otherwise the write side is shut and whatever arrives later is read and dropped
        until the client closes or `_LINGER_SECONDS` pass (`_linger`): a request that crosses
        our FIN meets a clean end of stream before any byte of an answer — never a reset, which
        could also destroy an answer still on its way — and a client may send it again on a new
        connection (RFC 9112 §9.3.1; clients do so on their own for idempotent requests).
        """
        transport = self.transport
        if transport is None or _unread(transport):
            return False
        self._linger()
        return True

    # -- connections over a limit --------------------------------------------------------------

    def _refuse(self, counter: CounterChild) -> None:
        """Over a connection limit: answer the first bytes with 503 and close.

        The request is never parsed: whatever the client sends first gets the same answer, so a
        refusal costs one write and a short linger, never a parser or a route.  A response sent
        before any request arrived could be taken by a client for a stale one and dropped, so
        the answer waits for the first bytes, at most `_REFUSAL_SECONDS` (then the connection
        is closed).  Past `_MAX_REFUSING` waiting on the listener (a flood), a refused
        connection is closed at once, as cheaply as before.
        """
        counter.inc()
        server = self.server
        transport = self.transport
        assert transport is not None
        self._stopped = True  # nothing is parsed on this connection
        if server.refusing >= _MAX_REFUSING:
            self._closing = True
            transport.abort()
            return
        server.refusing += 1
        self.deadline_kind = _REFUSED_FULL if counter is server.refused_full else _REFUSED_CLIENT
        # the sweeper looks only at served connections: this one has a timer of its own, which
        # also bounds the linger after the answer
        self._refusal_timer = self._loop.call_later(_REFUSAL_SECONDS, transport.abort)

    def _answer_refusal(self) -> None:
        transport = self.transport
        if transport is None or self._closing:
            return
        full = self.deadline_kind == _REFUSED_FULL
        self.deadline_kind = _LINGER  # what arrives from now on is dropped
        transport.write(_refusal(self.server.new_request_id(), full))
        if transport.can_write_eof():
            # shut our side and read on: closing with unread input would reset the answer
            transport.write_eof()
        else:
            self._close_transport()

    def check_deadline(self, now: float) -> None:
        """Called by the sweeper a few times a second."""
        transport = self.transport
        if transport is None or self._closing:
            return
        limits = self.server.snapshot.limits
        if self._write_paused and self._is_slow_reader(now, transport, limits):
            # a client that does not read its response holds buffers and an upstream: drop it
            self._closing = True
            transport.abort()
            self.server.slow_downloads.inc()
            return
        tunnel = self._tunnel
        if tunnel is not None:
            if self._tunnel_bytes != self._tunnel_seen:
                self._tunnel_seen = self._tunnel_bytes
                self._tunnel_active_at = now
            elif now - self._tunnel_active_at > limits.tunnel_idle_timeout:
                tunnel.close()
                self._close_transport()
            return
        current = self._current
        if current is not None and limits.min_data_rate:
            body = current.body
            if body is not None and body.check_rate(
                now, limits.min_data_rate, limits.min_data_rate_grace
            ):
                self.server.slow_uploads.inc()
        kind = self.deadline_kind
        if not kind or now < self.deadline:
            return
        self.deadline_kind = 0
        if kind == _HEAD and (self._in_head or self._head is not None):
            self._parse_failed(RequestTimeout("the request head did not arrive in time"))
            if self._start or self._wake is not None:
                self._run_queue()
        else:
            self._close_transport()


def _refused_by_route(head: RequestHead, route: Route) -> GatewayError | None:
    """The route's `http` rules: path spellings upstreams may read differently, and header
    names with "_" where the route rejects them."""
    refused = head.path_flags & route.refused_path_flags
    if refused:
        what = "';' in the path" if refused & PATH_SEMICOLON else "an ambiguous escape in the path"
        return BadRequest(f"{what} is refused on this route (http.path_* settings)")
    if route.reject_underscores:
        for name, _ in head.headers:
            if 0x5F in name:  # "_", as an int: a plain memchr
                return BadRequest("header names with '_' are refused on this route")
    return None


class _StopParsing(Exception):
    """Raised from a callback to stop llhttp where the connection's last request ended: after
    a request that closes the connection, or at the end of the body `_DeclaredBody` reads."""


@final
class _DeclaredBody:
    """llhttp callbacks for the body of an upgrade request that is not tunnelled.

    llhttp stops at the head of every upgrade request, so the body such a request declares
    would otherwise be parsed as the next request (request smuggling).  A fresh parser is fed
    a synthetic head carrying only the original framing, so llhttp — strict about chunk sizes
    and lengths — reads exactly the declared body; its head callbacks are absent here, and at
    the body's end `_StopParsing` stops the parser for good.
    """

    __slots__ = ("_connection", "_done")

    def __init__(self, connection: HttpConnection) -> None:
        self._connection = connection
        self._done = False

    def on_body(self, data: bytes) -> None:
        if not self._done:
            self._connection.on_body(data)

    def on_message_complete(self) -> None:
        if not self._done:
            self._done = True
            self._connection.on_message_complete()
        raise _StopParsing()


def _body_parser(connection: HttpConnection, head: RequestHead) -> httptools.HttpRequestParser:
    parser = httptools.HttpRequestParser(_DeclaredBody(connection))
    if head.chunked:
        framing = b"Transfer-Encoding: chunked\r\n"
    else:
        framing = b"Content-Length: %d\r\n" % (head.content_length or 0)
    parser.feed_data(b"POST / HTTP/1.1\r\nHost: body\r\n%b\r\n" % framing)
    return parser


def _valid_request_id(value: bytes) -> bool:
    return 0 < len(value) <= 200 and all(0x21 <= c <= 0x7E for c in value)


def _unread(transport: asyncio.Transport) -> int:
    """Bytes waiting in the socket's receive queue (0 when that cannot be told)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        queued = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", queued)[0])


def _refusal(request_id: bytes, full: bool) -> bytes:
    """The whole answer to a connection over a limit: 503, Retry-After, Connection: close."""
    detail = (
        "the gateway holds as many connections as it may (limits.max_connections)"
        if full
        else "too many connections from this address (limits.max_connections_per_client)"
    )
    error = TooManyConnections(detail, headers=[("Retry-After", "1")])
    response = problem_response(error, request_id)
    block = b"".join([b"%b: %b\r\n" % (n, v) for n, v in response.headers])
    return b"%b%bX-Request-Id: %b\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b" % (
        status_line(response.status),
        block,
        request_id,
        len(response.body),
        response.body,
    )
