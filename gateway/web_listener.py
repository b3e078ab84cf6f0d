"""An aiohttp application on one address: the admin and the status listeners (SPEC §8).

Neither is on the request path; each runs in worker 0 only, without SO_REUSEPORT, so its port
answers for the whole process group.  A request aiohttp cannot parse gets aiohttp's 400 and
becomes one warning line naming the listener, never a traceback quoting the request's bytes.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError


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


class WebListener:
    """Serves `app` on host:port once started; `port` is the bound one (port 0 picks one)."""

    def __init__(
        self, name: str, app: web.Application, host: str, port: int, logger: logging.Logger
    ) -> None:
        self.name = name
        self._app = app
        self._host = host
        self._port = port
        #: aiohttp's server logger for this listener: its own, so its lines can name it
        self._logger = logger
        self._runner: web.AppRunner | None = None
        self._bound = port

    async def start(self) -> None:
        if not any(isinstance(f, _MalformedRequestFilter) for f in self._logger.filters):
            self._logger.addFilter(_MalformedRequestFilter(self.name))
        runner = web.AppRunner(
            self._app, access_log=None, handle_signals=False, logger=self._logger
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        # the asyncio.Server behind the site, to learn a port chosen by the OS
        sockets = getattr(site._server, "sockets", None)
        if sockets:
            self._bound = int(sockets[0].getsockname()[1])

    @property
    def port(self) -> int:
        return self._bound

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
