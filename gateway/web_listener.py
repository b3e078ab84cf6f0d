"""An aiohttp application on one address: the admin and the status listeners (SPEC §8).

Neither is on the request path; each runs in worker 0 only, without SO_REUSEPORT, so its port
answers for the whole process group.  A request aiohttp cannot parse gets aiohttp's 400 and
becomes one warning line naming the listener, never a traceback quoting the request's bytes.

aiohttp gives a client as long as it likes to send a request head, so each connection is
guarded here the way the data plane guards its own (a status listener is usually bound on the
pod's address): the current `limits.header_timeout` for a head (from the connection's opening,
or from the first byte of a later one), else a 408 and close (a connection that sent nothing
is closed without one, as the data plane does); `limits.idle_timeout` between a response and
the next request, else close; and at most `max_connections` open at once, a connection over
it closed at once and counted as refused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.config.model import LimitsConfig
from gateway.runtime.listen import listening_socket

#: connections one admin or status listener holds at once: probes and scrapers need a few
MAX_CONNECTIONS: Final = 256
#: aiohttp's own keep-alive timer, left as a backstop behind the guard's idle_timeout
_AIOHTTP_KEEPALIVE: Final = 3600.0
#: asyncio's default accept queue: admin and status take few connections
_BACKLOG: Final = 100
_TIMEOUT_TEXT: Final = b"the request head did not arrive in time\r\n"
_REQUEST_TIMEOUT: Final = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(_TIMEOUT_TEXT), _TIMEOUT_TEXT)
)
# what a guarded connection waits for
_HEAD: Final = 1  # a request head (the timer: header_timeout)
_ANSWERING: Final = 2  # its handler (no timer)
_IDLE: Final = 3  # the next request, after an answer (the timer: idle_timeout)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse as an ERROR with a traceback that quotes the
    offending bytes — an Authorization value, say — and any client that reaches the port can
    send such requests as often as it likes.  Those become one line: what was wrong, from
    where, no bytes of the request."""

    def __init__(self, listener: str) -> None:
        super().__init__()
        self.listener = listener

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg = f"{self.listener} listener: malformed request (%s)"
            record.args = (type(error).__name__,)
            # an ERROR becomes a WARNING; aiohttp keeps non-HTTP bytes (a scanner, TLS sent to
            # a plain port) at DEBUG, and so do we
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = None
            record.exc_text = None
        return True


class _GuardedConnection(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the listener's deadlines around it (see the
    module docstring).  The listener's middleware tells it when a head has been read and when
    its answer is ready (`answering`, `answered`)."""

    def __init__(self, listener: WebListener, handler: asyncio.Protocol) -> None:
        self._listener = listener
        self._handler = handler
        self._transport: asyncio.Transport | None = None
        self._state = _HEAD
        #: whether any byte of the awaited head has come (then a late head is answered 408)
        self._head_begun = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not an asyncio.Transport subclass, hence the cast)
        transport = cast(asyncio.Transport, transport)
        listener = self._listener
        if len(listener.connections) >= listener.max_connections:
            transport.abort()
            if listener.on_refused is not None:
                listener.on_refused()
            return
        self._transport = transport
        listener.connections[transport] = self
        self._handler.connection_made(transport)
        self._wait(_HEAD)

    def data_received(self, data: bytes) -> None:
        if self._state == _IDLE:
            self._wait(_HEAD)  # a new head began: it must end in time
        self._head_begun = True
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        transport = self._transport
        if transport is None:
            return  # refused over max_connections: aiohttp never saw it
        self._transport = None
        del self._listener.connections[transport]
        self._handler.connection_lost(exc)

    def answering(self) -> None:
        self._state = _ANSWERING
        self._cancel()

    def answered(self) -> None:
        if self._state == _ANSWERING:
            self._wait(_IDLE)

    def _wait(self, state: int) -> None:
        self._cancel()
        self._state = state
        self._head_begun = False
        limits = self._listener.limits()
        delay = limits.header_timeout if state == _HEAD else limits.idle_timeout
        self._timer = asyncio.get_running_loop().call_later(delay, self._expired)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._state == _HEAD and self._head_begun:
            transport.write(_REQUEST_TIMEOUT)
        transport.close()


class WebListener:
    """Serves `app` on host:port once started; `port` is the bound one (port 0 picks one).
    `limits` gives the current limits (read at each deadline, so a reload applies to the next
    one); `on_refused` hears of each connection closed over `max_connections`."""

    def __init__(
        self,
        name: str,
        app: web.Application,
        host: str,
        port: int,
        logger: logging.Logger,
        limits: Callable[[], LimitsConfig] = LimitsConfig,
        on_refused: Callable[[], None] | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.name = name
        self._app = app
        self._host = host
        self._port = port
        #: aiohttp's server logger for this listener: its own, so its lines can name it
        self._logger = logger
        self.limits = limits
        self.on_refused = on_refused
        self.max_connections = max_connections
        #: the open connections' guards, by transport (the middleware finds a request's so)
        self.connections: dict[asyncio.BaseTransport, _GuardedConnection] = {}
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._bound = port

    async def start(self) -> None:
        if not any(isinstance(f, _MalformedRequestFilter) for f in self._logger.filters):
            self._logger.addFilter(_MalformedRequestFilter(self.name))
        # outermost, so it sees every request of the app, its own 404s and problems included
        self._app.middlewares.insert(0, self._guard)
        runner = web.AppRunner(
            self._app,
            access_log=None,
            handle_signals=False,
            logger=self._logger,
            keepalive_timeout=_AIOHTTP_KEEPALIVE,
        )
        await runner.setup()
        handlers = runner.server
        assert handlers is not None
        loop = asyncio.get_running_loop()
        try:

            def factory() -> _GuardedConnection:
                return _GuardedConnection(self, handlers())

            # bound here for an IP address: no resolver thread left behind (runtime.listen)
            sock = listening_socket(self._host, self._port, backlog=_BACKLOG)
            if sock is not None:
                self._server = await loop.create_server(factory, sock=sock, backlog=_BACKLOG)
            else:
                self._server = await loop.create_server(
                    factory, self._host, self._port, backlog=_BACKLOG
                )
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._bound = int(self._server.sockets[0].getsockname()[1])

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        guard = self.connections.get(request.transport) if request.transport else None
        if guard is not None:
            guard.answering()
        try:
            return await handler(request)
        finally:
            if guard is not None:
                guard.answered()

    @property
    def port(self) -> int:
        return self._bound

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()  # no new connections; aiohttp closes the open ones
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
