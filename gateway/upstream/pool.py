"""Keep-alive connection pool of one upstream endpoint.

Bookkeeping only — the I/O lives in `UpstreamConnection`.  Idle connections are reused last in,
first out (the warmest first) and closed after `idle_timeout`; at most `max_connections` are
open or opening at once, and a request that finds the pool full waits for one to be released
for at most `queue_timeout`, then gets 503 `upstream_busy` (never sent: safe to try again).
Waiting requests are served client address by client address in turn (`WaitQueue`), so one
client with hundreds of requests queued cannot make another wait behind all of them.
Before it waits, the connection whose client has read its response slower than the minimum data
rate for the longest — at least `STALL_EVICTION` seconds — is taken back (`evict`): clients that
stop reading give way to requests that wait, so slow readers can never hold a whole pool.  A
connection comes back through `release()`; one that is not `reusable` is closed there and never
handed out again.

A pool whose upstream a reload removed or changed is `retire`d, not closed: requests routed to it
on the old snapshot (and their retries) are still served — waiters keep their turn, a connection
is opened when there is no other — but it keeps no idle connection: each one is closed when its
exchange ends, and once it holds none the pool calls `on_drained` (again, should a late request
open one more).  Only `close()`, at shutdown, turns requests away.

Response-head timeouts cost no timer per request: a connection in use records a deadline, and
while any connection is in use the pool looks at them every `WATCH_INTERVAL` seconds.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import final

from gateway.core.waiter import into_task
from gateway.errors import ConnectFailed, ConnectTimeout, UpstreamBusy
from gateway.observability.instruments import clock
from gateway.upstream.connection import UpstreamConnection

#: how often in-use connections' deadlines are checked (the precision of header timeouts)
WATCH_INTERVAL = 0.1
#: how long a client must have read its response slower than the minimum rate (the server
#: protocol refreshes `stalled_since` while it keeps up) before a waiting request may take its
#: pooled connection
STALL_EVICTION = 0.5


class PoolObserver:
    """Metrics hooks, resolved to label children once per pool; this base observes nothing.

    A class, not a Protocol: compiled, a pool calls its observer's methods through the class's
    method table; a call on a Protocol is a lookup by name (~200 instructions, callgrind) on
    every request's acquire."""

    __slots__ = ()

    def on_connect(self, seconds: float) -> None:
        pass

    def on_handshake(self, seconds: float) -> None:
        pass

    def on_acquire(self, reused: bool) -> None:
        pass

    def on_evict(self) -> None:
        pass


@final
class EndpointPool:
    __slots__ = (
        "_busy",
        "_idle",
        "_loop",
        "_next_eviction_scan",
        "_on_drained",
        "_retired",
        "_sweeper",
        "_waiters",
        "_watcher",
        "connect_timeout",
        "host",
        "idle_timeout",
        "loop_time",
        "max_connections",
        "observer",
        "opened",
        "port",
        "queue_timeout",
        "server_name",
        "tls",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        *,
        max_connections: int,
        idle_timeout: float,
        connect_timeout: float,
        observer: PoolObserver,
        queue_timeout: float = 1.0,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        self._loop = loop
        #: `loop.time`, bound once (a method looked up per call costs ~100 instructions); the
        #: pool's connections read it too
        self.loop_time: Callable[[], float] = loop.time
        #: for an https endpoint: the client context and the name verified (and sent as SNI)
        self.tls = tls
        self.server_name = server_name or host
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.queue_timeout = queue_timeout
        self.observer = observer
        #: idle connections, the oldest first: a request takes the newest (`pop`, warm in the
        #: upstream's caches too), the sweeper closes from the front.  A list, not a deque:
        #: compiled, its append and pop are direct calls, not methods looked up by name
        self._idle: list[UpstreamConnection] = []
        #: connections handed out and not yet released
        self._busy: set[UpstreamConnection] = set()
        self._watcher: asyncio.TimerHandle | None = None
        self._waiters = WaitQueue()
        self._next_eviction_scan = 0.0
        #: connections open or being opened (idle ones included)
        self.opened = 0
        #: retired or closed: no connection is kept idle
        self._retired = False
        #: told whenever a retired pool holds no connection any more
        self._on_drained: Callable[[], None] | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        """Requests waiting for a connection (a few may have given up already)."""
        return self._waiters.count

    @property
    def is_drained(self) -> bool:
        """Retired (or closed) and holding no connection: nothing of it is left to close."""
        return self._retired and self.opened == 0

    def take_idle(self) -> UpstreamConnection | None:
        """A warm connection at once, or None: the hot path, without a coroutine."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.is_closed:
                continue
            conn.in_use = True
            conn.reused = True
            self._busy.add(conn)
            self.observer.on_acquire(True)
            return conn
        return None

    async def acquire(
        self,
        connect_timeout: float | None = None,
        queue_timeout: float | None = None,
        client: str = "",
    ) -> UpstreamConnection:
        """A connection ready for one exchange; raises a GatewayError when none can be had.

        `client` (the client's address) decides whose turn it is when requests must wait."""
        timeout = self.connect_timeout if connect_timeout is None else connect_timeout
        wait = self.queue_timeout if queue_timeout is None else queue_timeout
        conn = self.take_idle()
        if conn is not None:
            return conn
        # a retired pool still gets here (requests routed to it before a reload): it serves them
        if self.opened >= self.max_connections:
            waiter: asyncio.Future[UpstreamConnection | None] = self._loop.create_future()
            self._waiters.add(client, waiter)
            try:
                await self._wait_for_slot(waiter, max(wait, 0.0))
            except BaseException:
                self._give_back(waiter)
                raise
            conn_or_none = waiter.result()
            if conn_or_none is not None:
                conn_or_none.in_use = True
                conn_or_none.reused = True
                self.observer.on_acquire(True)
                return conn_or_none
            # a slot was freed: open a connection in it (opened was already counted for us)
            return await self._connect(timeout, counted=True)
        return await self._connect(timeout, counted=False)

    def _give_back(self, waiter: asyncio.Future[UpstreamConnection | None]) -> None:
        """A request stopped waiting (timed out, or cancelled when its client left).  Its
        waiter may have been served in the same turn of the loop, before the request could run
        again: what it was handed must go on, or that connection or slot is lost for good."""
        if not waiter.done():
            waiter.cancel()  # WaitQueue skips it
            return
        if waiter.cancelled() or waiter.exception() is not None:
            return
        conn = waiter.result()
        if conn is None:
            self._slot_freed()  # the slot counted for it: to the next waiter, or free
        else:
            self.release(conn)  # unused: to the next waiter, or idle

    async def _connect(self, limit: float, *, counted: bool) -> UpstreamConnection:
        if not counted:
            self.opened += 1
        loop = self._loop
        conn = UpstreamConnection(loop, self)
        # loop time for what is left of the connect timeout, instruments.clock for the
        # reported durations
        started = self.loop_time()
        began = clock()
        try:
            # a request's driven coroutine is not a task, which Python 3.12's wait_for needs
            await into_task()
            await asyncio.wait_for(
                loop.create_connection(lambda: conn, self.host, self.port), limit
            )
        except TimeoutError:
            if conn.transport is not None:
                conn.close()  # connected just too late: connection_lost frees the slot
            else:
                self._slot_freed()
            raise ConnectTimeout(f"connecting to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            self._slot_freed()
            raise ConnectFailed(
                f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        except BaseException:
            self._slot_freed()
            raise
        connected = clock()
        self.observer.on_connect(connected - began)
        if self.tls is not None:
            await self._handshake(conn, self.tls, limit - (self.loop_time() - started))
            self.observer.on_handshake(clock() - connected)
        self.observer.on_acquire(False)
        conn.in_use = True
        conn.reused = False
        self._busy.add(conn)
        return conn

    async def _handshake(self, conn: UpstreamConnection, tls: ssl.SSLContext, limit: float) -> None:
        """TLS over the connected socket, timed on its own (the connect timeout covers both)."""
        transport = conn.transport
        assert transport is not None
        where = f"{self.host}:{self.port}"
        try:
            secure = await asyncio.wait_for(
                self._loop.start_tls(transport, conn, tls, server_hostname=self.server_name),
                max(limit, 0.001),
            )
        except TimeoutError:
            conn.close()
            raise ConnectTimeout(f"TLS handshake with {where} timed out") from None
        except (ssl.SSLError, OSError) as exc:
            conn.close()
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            raise ConnectFailed(f"TLS handshake with {where} failed: {reason}") from exc
        except BaseException:
            conn.close()
            raise
        if secure is None:
            conn.close()
            raise ConnectFailed(f"TLS handshake with {where} failed: connection closed")
        conn.use_transport(secure)

    async def _wait_for_slot(
        self, waiter: asyncio.Future[UpstreamConnection | None], wait: float
    ) -> None:
        """Wait at most `wait` seconds for `waiter`, meanwhile taking slots back from clients
        that have stalled long enough (looked for a few times a second, by whichever waiter)."""
        deadline = self.loop_time() + wait
        while not waiter.done():
            now = self.loop_time()
            if now >= self._next_eviction_scan:
                self._next_eviction_scan = now + STALL_EVICTION / 4
                self._evict_stalled(self._waiters.count)
            left = deadline - now
            if left <= 0:
                raise UpstreamBusy(
                    f"all {self.max_connections} connections to the upstream stayed busy",
                    headers=[("Retry-After", "1")],
                )
            await asyncio.wait((waiter,), timeout=min(left, STALL_EVICTION / 4))

    def _evict_stalled(self, wanted: int) -> None:
        """Free up to `wanted` slots, from the clients stalled longest (at least STALL_EVICTION)."""
        since = self.loop_time() - STALL_EVICTION
        stalled = [
            conn
            for conn in self._busy
            if conn.stalled_since and conn.stalled_since <= since and not conn.is_closed
        ]
        if not stalled:
            return
        stalled.sort(key=_stalled_since)
        for conn in stalled[:wanted]:
            # its connection_lost frees the slot, which goes to the first waiter
            conn.evict()
            self.observer.on_evict()

    def release(self, conn: UpstreamConnection) -> None:
        """Take a connection back after one exchange; closes it unless it is reusable."""
        conn.deadline = 0.0
        if not conn.reusable or conn.is_closed:
            self._busy.discard(conn)
            conn.close()
            return  # on_connection_lost frees the slot
        if self._waiters.count:
            waiter = self._waiters.pop()
            if waiter is not None:
                waiter.set_result(conn)  # handed over: still busy (a retired pool too)
                return
        if self._retired:
            # keeps nothing idle: on_connection_lost frees the slot and may find it drained
            self._busy.discard(conn)
            conn.close()
            return
        self._busy.discard(conn)
        conn.idle_since = self.loop_time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self.idle_timeout, self._sweep)

    def detach(self, conn: UpstreamConnection) -> None:
        """A connection that became a tunnel (a 101) leaves the pool and frees its slot: a
        WebSocket may live for hours, and silent ones must not hold a pool's requests back."""
        conn.in_use = False
        self._busy.discard(conn)
        self._slot_freed()

    def on_connection_lost(self, conn: UpstreamConnection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)
        self._busy.discard(conn)
        self._slot_freed()

    def watch(self) -> None:
        """A connection in use has a deadline: make sure someone looks at it."""
        if self._watcher is None:
            self._watcher = self._loop.call_later(WATCH_INTERVAL, self._check_deadlines)

    def _check_deadlines(self) -> None:
        self._watcher = None
        now = self.loop_time()
        waiting = False
        for conn in list(self._busy):
            conn.check_deadline(now)
            waiting = waiting or conn.deadline > 0
        if waiting:
            # connections in use without a deadline (tunnels, bodies being piped) need no look
            self._watcher = self._loop.call_later(WATCH_INTERVAL, self._check_deadlines)

    def _slot_freed(self) -> None:
        self.opened -= 1
        waiter = self._waiters.pop()
        if waiter is not None:
            self.opened += 1
            waiter.set_result(None)
        elif self.opened == 0 and self._on_drained is not None:
            self._on_drained()

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = self.loop_time() - self.idle_timeout
        idle = self._idle
        # the oldest are on the left
        expired = 0
        while expired < len(idle) and idle[expired].idle_since <= deadline:
            expired += 1
        if expired:
            gone = idle[:expired]
            del idle[:expired]
            for conn in gone:
                conn.close()
        if idle:
            wait = idle[0].idle_since + self.idle_timeout - self.loop_time()
            self._sweeper = self._loop.call_later(max(wait, 0.01), self._sweep)

    def retire(self, on_drained: Callable[[], None]) -> None:
        """No longer in the live config: close idle connections now, keep serving the requests
        routed here, close each connection as its exchange ends, and call `on_drained` whenever
        no connection is left (at once if there is none now)."""
        self._on_drained = on_drained
        self._stop_keeping()
        if self.opened == 0:
            on_drained()
        # else the idle ones just closed, and the busy ones, free their slots in
        # on_connection_lost, and the last one calls on_drained

    def close(self) -> None:
        """At shutdown: close idle connections now, busy ones when they are released, and fail
        the requests still waiting."""
        self._stop_keeping()
        while (waiter := self._waiters.pop()) is not None:
            waiter.set_exception(ConnectFailed("the gateway is shutting down"))

    def _stop_keeping(self) -> None:
        self._retired = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        # busy connections keep being watched until they are released
        while self._idle:
            self._idle.pop().close()


@final
class WaitQueue:
    """Requests waiting for a pooled connection, served one client address after another.

    Each client has its own first-in-first-out queue, and the clients take turns: a freed slot
    goes to the first waiter of the client whose turn it is.  Futures that are done (their
    request gave up) are skipped when they come up; only the waiting path pays for any of it.
    """

    __slots__ = ("_by_client", "_turns", "count")

    def __init__(self) -> None:
        self._by_client: dict[str, deque[asyncio.Future[UpstreamConnection | None]]] = {}
        #: clients with waiters, in the order of their turns
        self._turns: deque[str] = deque()
        #: waiters added and not yet taken out (a few may be done already)
        self.count = 0

    def add(self, client: str, waiter: asyncio.Future[UpstreamConnection | None]) -> None:
        queue = self._by_client.get(client)
        if queue is None:
            queue = self._by_client[client] = deque()
            self._turns.append(client)
        queue.append(waiter)
        self.count += 1

    def pop(self) -> asyncio.Future[UpstreamConnection | None] | None:
        """The next waiter still waiting, in turn; None when there is none."""
        turns = self._turns
        while turns:
            client = turns.popleft()
            queue = self._by_client[client]
            while queue:
                waiter = queue.popleft()
                self.count -= 1
                if not waiter.done():
                    if queue:
                        turns.append(client)  # its next waiter comes after the others'
                    else:
                        del self._by_client[client]
                    return waiter
            del self._by_client[client]
        return None


def _stalled_since(conn: UpstreamConnection) -> float:
    return conn.stalled_since
