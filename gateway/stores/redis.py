"""The redis store: state shared by every worker and replica that names the same Redis.

Built on redis-py's asyncio client (with hiredis parsing replies).  Every operation is bounded
by the store's `timeout` as a whole — connecting, waiting for the reply, a server paused or
gone — and any failure is raised as `StoreError`, so the stage's `on_store_error` decides what
the client gets; the client reconnects by itself on the next operation once Redis is back.

Idempotency records (SPEC §5.5) are Redis hashes, one per scoped key, each changed by one Lua
script, so that reading a record and taking the lock are one atomic step for every replica:
two gateways can never both see "no record".  Every record has a TTL — the lock's while the
first request runs, the stage's `ttl` once it completed or its outcome is unknown — so nothing
lives forever.  A script touches its one key only, so the store works the same on a Redis
Cluster.  `max_keys` and `max_bytes` bound the memory store; in Redis the records are bounded by
their TTLs and by Redis's own `maxmemory`: with `maxmemory-policy noeviction` (what the README
recommends) a full Redis refuses new locks, which the stage answers per `on_store_error`, and
never evicts a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, TypeVar, final
from urllib.parse import urlsplit

from gateway.config.model import StoreConfig, StoreTLSConfig
from gateway.config.stores import redacted_url
from gateway.core.waiter import into_task
from gateway.observability.instruments import (
    DEFAULT_BUCKETS,
    CounterChild,
    GaugeChild,
    HistogramChild,
    clock,
)
from gateway.stores.base import (
    IN_USE,
    NEW,
    REPLAY,
    REUSED,
    UNKNOWN,
    Begin,
    RecordsMeter,
    StoredResponse,
    StoreError,
)
from gateway.stores.redis_leases import RedisRateLimiter

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster
    from redis.commands.core import AsyncScript

    from gateway.observability.metrics import GatewayMetrics

T = TypeVar("T")

#: writes kept trying after a failure, at most (per store and worker)
MAX_RETRIED: Final = 10_000
#: seconds operations fail at once after a failure: the first pause, and the longest
BACKOFF_FIRST: Final = 0.05
BACKOFF_MAX: Final = 1.0
#: how long closing the connections may take before the store gives up on them
CLOSE_SECONDS: Final = 2.0

log = logging.getLogger("gateway.stores")

#: the record's fields: state, fingerprint, the stored answer, and the lock's owner (a random
#: token per `begin`).  state: "lock" (in flight), "unknown", "pending" (answered, body
#: streaming), "done", or "abandoned" (a tombstone: see _ABANDON)
_BEGIN: Final = """
local r = redis.call('HMGET', KEYS[1], 'st', 'fp', 'status', 'headers', 'body', 'replayable',
                     'owner')
local state = r[1]
if state == 'abandoned' then
  redis.call('DEL', KEYS[1])
  if r[7] == ARGV[3] then return {'abandoned'} end
  state = false
end
if not state then
  redis.call('HSET', KEYS[1], 'st', 'lock', 'fp', ARGV[1], 'owner', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'new'}
end
if r[2] ~= ARGV[1] then return {'reused'} end
if state == 'unknown' then return {'unknown'} end
if state == 'lock' then return {'in_use', redis.call('PTTL', KEYS[1])} end
return {state, r[3], r[4], r[5], r[6]}
"""

#: a `begin` whose answer never came (timed out, connection lost): the request was not run, so
#: its lock — if the script ran, or when it runs later — must not make the client wait for
#: the lock's ttl.  Its own lock is deleted; with no record yet, a tombstone is left that the
#: late `begin` of this owner finds and removes instead of locking.  Anyone else's record is
#: left alone.
_ABANDON: Final = """
local r = redis.call('HMGET', KEYS[1], 'st', 'owner')
if r[1] == 'lock' and r[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
if not r[1] then
  redis.call('HSET', KEYS[1], 'st', 'abandoned', 'owner', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 2
end
return 0
"""

#: an answer replaces the lock (nothing when the lock expired meanwhile, unless ARGV[7] is the
#: fingerprint: a write retried after an outage, when Redis may have lost the lock)
_COMPLETE: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[7] == '' then return 0 end
  redis.call('HSET', KEYS[1], 'fp', ARGV[7])
end
redis.call('HSET', KEYS[1], 'st', ARGV[1], 'status', ARGV[2], 'headers', ARGV[3],
           'body', ARGV[4], 'replayable', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
"""

#: a lock, or an answer whose body broke off, is forgotten; an unknown outcome or a complete
#: answer never is
_RELEASE: Final = """
local state = redis.call('HGET', KEYS[1], 'st')
if state == 'lock' or state == 'pending' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

#: kept as unknown for the ttl, whatever it was (the first fingerprint kept when there is one)
_MARK_UNKNOWN: Final = """
local fp = redis.call('HGET', KEYS[1], 'fp') or ARGV[1]
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'st', 'unknown', 'fp', fp)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


def encode_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """Header lines as length-prefixed fields (`<len>:<bytes>` for each name and value): any
    byte can appear in a value, order and repeats are kept."""
    return b"".join(b"%d:%b%d:%b" % (len(n), n, len(v), v) for n, v in headers)


def decode_headers(data: bytes) -> list[tuple[bytes, bytes]]:
    fields: list[bytes] = []
    at = 0
    while at < len(data):
        colon = data.index(b":", at)
        size = int(data[at:colon])
        field = data[colon + 1 : colon + 1 + size]
        if len(field) != size:
            raise ValueError("a truncated header field")
        fields.append(field)
        at = colon + 1 + size
    if len(fields) % 2:
        raise ValueError("an odd number of header fields")
    return list(zip(fields[0::2], fields[1::2], strict=True))


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


@final
class RedisIdempotencyRecords:
    """One idempotency stage's records under `<prefix>idem:<namespace>:<key>`."""

    __slots__ = (
        "_begin",
        "_complete",
        "_fingerprints",
        "_mark_unknown",
        "_prefix",
        "_release",
        "_store",
    )

    def __init__(self, store: RedisStore, namespace: str) -> None:
        self._store = store
        self._prefix = f"{store.prefix}idem:{namespace}:"
        #: the fingerprints of the keys this worker holds locks for (until their outcome is
        #: written): a write retried after an outage recreates the record with it
        self._fingerprints: dict[str, str] = {}
        client = store.client
        self._begin: AsyncScript = client.register_script(_BEGIN)
        self._complete: AsyncScript = client.register_script(_COMPLETE)
        self._release: AsyncScript = client.register_script(_RELEASE)
        self._mark_unknown: AsyncScript = client.register_script(_MARK_UNKNOWN)

    def key_name(self, key: str) -> str:
        """The Redis key of `key`'s record."""
        return self._prefix + key

    def begin_script(
        self, name: str, fingerprint: str, lock_ttl: float, owner: str
    ) -> Awaitable[Any]:
        return self._begin(keys=[name], args=[fingerprint, _milliseconds(lock_ttl), owner])

    async def begin(self, key: str, fingerprint: str, lock_ttl: float) -> Begin:
        name = self._prefix + key
        owner = secrets.token_hex(8)
        try:
            reply = await self._store.run(
                self.begin_script(name, fingerprint, lock_ttl, owner), name
            )
        except StoreError:
            # the script may have run (or may yet run) and taken the lock for a request that
            # will not be sent: give it up in the background
            self._store.give_up(name, owner, lock_ttl)
            raise
        assert isinstance(reply, list)
        outcome = reply[0].decode()
        if outcome == "abandoned":  # only a caller that gave up can get this: never read
            raise StoreError(f"store {self._store.name!r}: a lock given up")
        if outcome == "new":
            self._fingerprints[key] = fingerprint
            return Begin(NEW)
        if outcome == "reused":
            return Begin(REUSED)
        if outcome == "unknown":
            return Begin(UNKNOWN)
        if outcome == "in_use":
            return Begin(IN_USE, retry_after=max(int(reply[1]), 0) / 1000)
        _, status, headers, body, replayable = reply
        return Begin(
            REPLAY,
            StoredResponse(
                int(status),
                decode_headers(headers),
                body,
                replayable=replayable == b"1",
                pending=outcome == "pending",
            ),
        )

    async def complete(self, key: str, response: StoredResponse, ttl: float) -> None:
        """Never fails the request: the upstream has answered, so when Redis cannot take the
        answer now it is written in the background, for as long as the record would live —
        recreating the record when Redis lost the lock meanwhile — and until then a repeat may
        find the lock (409) or, once the lock expired, run again."""
        name = self._prefix + key
        fingerprint = (
            self._fingerprints.get(key, "") if response.pending else self._fingerprints.pop(key, "")
        )
        fields = [
            "pending" if response.pending else "done",
            response.status,
            encode_headers(response.headers),
            response.body,
            "1" if response.replayable else "0",
        ]
        try:
            await self._store.run(
                self._complete(keys=[name], args=[*fields, _milliseconds(ttl), ""]), name
            )
        except StoreError:
            if fingerprint:
                self._store.keep_trying(
                    name,
                    ttl,
                    lambda left: self._complete(
                        keys=[name], args=[*fields, _milliseconds(left), fingerprint]
                    ),
                )

    async def release(self, key: str) -> None:
        """Never fails the request: when Redis cannot forget the lock now, it expires with its
        ttl (retrying later could remove another request's lock on the same key)."""
        self._fingerprints.pop(key, None)
        with contextlib.suppress(StoreError):
            name = self._prefix + key
            await self._store.run(self._release(keys=[name]), name)

    async def mark_unknown(self, key: str, fingerprint: str, ttl: float) -> None:
        """Never fails the request: an unknown outcome Redis cannot take now is written in the
        background for as long as it would be kept."""
        self._fingerprints.pop(key, None)
        name = self._prefix + key
        try:
            await self._store.run(
                self._mark_unknown(keys=[name], args=[fingerprint, _milliseconds(ttl)]), name
            )
        except StoreError:
            self._store.keep_trying(
                name,
                ttl,
                lambda left: self._mark_unknown(
                    keys=[name], args=[fingerprint, _milliseconds(left)]
                ),
            )

    async def close(self) -> None:
        return None  # the records stay in Redis; the store owns the connections and tasks


@functools.cache
def _cluster_class() -> type[RedisCluster]:
    """redis-py's cluster client (8.x), made to keep serving the keys of the masters that are
    up while one is down, and to fail every operation as a RedisError.  Each change is tested
    in tests/integration/test_redis_cluster_store.py:

    - a script answered NOSCRIPT runs as EVAL on its key's master (which caches it), where
      AsyncScript sends SCRIPT LOAD to every master, failing while one is down.  Neither
      sends a script that ran: a master answering NOSCRIPT did not run it;
    - COMMAND is read when a command needs it (a script never does), not from the first
      master listed each time the slots are read, failing while that one is down;
    - the slots are read before a new client's first commands, which redis-py otherwise sends
      to random masters (MOVED);
    - CLUSTERDOWN (or a slot no master serves) makes it read the slots again, without
      closing every connection under the other operations in flight;
    - closing it closes its connections even after a connection error.
    """
    from redis._parsers import AsyncCommandsParser
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.commands.core import AsyncScript
    from redis.exceptions import NoScriptError
    from redis.typing import EncodableT, KeyT, ScriptTextT

    class OneNodeScript(AsyncScript):
        async def __call__(
            self,
            keys: Sequence[KeyT] | None = None,
            args: Iterable[EncodableT] | None = None,
            client: Any = None,
        ) -> Any:
            keys = list(keys or ())
            values = [*keys, *(args or ())]
            target = self.registered_client if client is None else client
            try:
                return await target.evalsha(self.sha, len(keys), *values)
            except NoScriptError:
                script = self.script
                text = script if isinstance(script, str) else bytes(script).decode()
                return await target.eval(text, len(keys), *values)

    #: whether the running task is inside redis-py's handling of one command
    in_command: ContextVar[bool] = ContextVar("in_cluster_command", default=False)

    class CommandsOnDemand(AsyncCommandsParser):
        async def initialize(self, node: ClusterNode | None = None) -> None:
            if node is None:  # a command whose keys only COMMAND can find (never a script's)
                await super().initialize()
            else:
                self.node = node

    class Cluster(RedisCluster):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # redis-py reads COMMAND from the first master it lists each time it reads the
            # slots, and fails to start while that master is down, whatever the others serve
            self.commands_parser = CommandsOnDemand()

        # (redis-py's own async register_script overrides the sync one's type the same way)
        def register_script(self, script: ScriptTextT) -> AsyncScript:  # type: ignore[override]
            return OneNodeScript(self, script)

        async def execute_command(self, *args: EncodableT, **kwargs: Any) -> Any:
            # redis-py picks a command's node before it reads the slots when it has none yet
            # (a new client): commands issued together then go to random masters and come
            # back MOVED.  The slots are read first instead.
            if self._initialize:
                await self.initialize()
            return await super().execute_command(*args, **kwargs)

        async def _execute_command(
            self, target_node: ClusterNode, *args: Any, **kwargs: Any
        ) -> Any:
            token = in_command.set(True)
            try:
                return await super()._execute_command(target_node, *args, **kwargs)
            finally:
                in_command.reset(token)

        async def aclose(self) -> None:
            if in_command.get():
                # redis-py's answer to CLUSTERDOWN or a slot no master serves: it closed every
                # connection under the other operations in flight, which then failed with
                # errors of all kinds (a RuntimeError among them).  What it is for, reading
                # the slots again, is kept.
                self._initialize = True
                return
            # the store closes it: redis-py closes nothing while it means to read the slots
            # again, as after any connection error, which would leave every connection open
            self._initialize = False
            await super().aclose()

    return Cluster


def _cluster_client(
    nodes: Sequence[str], *, timeout: float, pool_size: int, options: dict[str, Any]
) -> RedisCluster:
    """A Redis Cluster client that learns the masters and their slots from the seed `nodes`
    (their user and password are every node's) and never sends a command twice by itself."""
    from redis.asyncio.cluster import ClusterNode
    from redis.asyncio.connection import parse_url
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    seeds = [parse_url(node) for node in nodes]
    if any("host" not in seed or seed.get("db", 0) for seed in seeds):
        raise ValueError("a cluster's nodes are redis:// or rediss:// urls of database 0")
    ssl = {"ssl": True, **options} if urlsplit(nodes[0]).scheme == "rediss" else {}
    return _cluster_class()(
        startup_nodes=[ClusterNode(s["host"], s.get("port", 6379)) for s in seeds],
        username=seeds[0].get("username"),
        password=seeds[0].get("password"),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        max_connections=pool_size,  # per node
        # no retries inside an operation (see RedisStore): a connection error or timeout is
        # raised, not answered by reading the slots again and sending the command once more.
        # The client still follows MOVED, ASK and TRYAGAIN: a node that answers one of those
        # ran nothing, so the one node that runs the script runs it once
        retry=Retry(NoBackoff(), 0),
        # a MOVED updates that slot and is followed; redis-py's default (every 5th MOVED closes
        # every connection and reads the slots again) fails the other operations in flight
        reinitialize_steps=0,
        # a slot no master serves fails only its keys (SlotNotCoveredError), not the client
        require_full_coverage=False,
        # topology is always read again from the seeds as configured (names resolved again),
        # not from the addresses learnt last time, which may all have moved
        dynamic_startup_nodes=False,
        **ssl,
    )


@final
class StoreMeter:
    """Where a store reports: whether it answers, its operations by outcome and their
    durations (the metric children of its name; fresh ones no registry renders by default)."""

    __slots__ = ("backoff", "duration", "error", "ok", "timeout", "up")

    def __init__(self, metrics: GatewayMetrics | None = None, name: str = "") -> None:
        if metrics is None:
            self.up = GaugeChild()
            self.ok, self.error, self.timeout = CounterChild(), CounterChild(), CounterChild()
            self.backoff = CounterChild()
            self.duration = HistogramChild(DEFAULT_BUCKETS)
            return
        operations = metrics.store_operations_total
        self.up = metrics.store_up.labels(name)
        self.ok = operations.labels(name, "ok")
        self.error = operations.labels(name, "error")
        self.timeout = operations.labels(name, "timeout")
        self.backoff = operations.labels(name, "backoff")
        self.duration = metrics.store_operation_duration_seconds.labels(name)


@final
class RedisStore:
    """A named redis store: one client (a pool of connections, opened as needed) per worker.
    `config` is what it was built from: a reload keeps the store while that is unchanged.
    With `nodes`, a Redis Cluster's seed nodes, the client is a cluster client instead (and
    `url` is not used): each script touches one key, so it runs on the one master of that
    key's slot."""

    def __init__(
        self,
        name: str,
        url: str = "",
        *,
        nodes: Sequence[str] = (),
        prefix: str = "gw:",
        timeout: float = 0.1,
        pool_size: int = 32,
        tls: StoreTLSConfig | None = None,
        meter: StoreMeter | None = None,
    ) -> None:
        self.name = name
        self.prefix = prefix
        self.timeout = timeout
        self.config: StoreConfig | None = None
        #: "unknown" until the first operation, then "down" while the latest operation on
        #: some part of it failed (a cluster's master; the one Redis), else "up"
        self.state = "unknown"
        self.last_error: str | None = None
        #: the parts down (a cluster master's "host:port"; "" for the store as a whole) ->
        #: (until when, clock(), operations on it fail at once; the next pause)
        self._down: dict[str, tuple[float, float]] = {}
        #: closing: no new background work is taken; closed: no operation is sent (one would
        #: open a connection again, which nothing would close)
        self._closing = False
        self._closed = False
        #: operations sent and not answered yet; closing waits for them (each is bounded by
        #: the timeout) so that none opens a connection after the others are closed
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self.meter = meter or StoreMeter()
        options: dict[str, Any] = {}
        if tls is not None:
            options = {
                "ssl_ca_certs": tls.ca,
                "ssl_certfile": tls.cert,
                "ssl_keyfile": tls.key,
            }
        # imported here, not with the module: redis-py imports OpenTelemetry's SDK when it is
        # installed (~0.2 s and ~10 MiB), which a gateway without a redis store never pays
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisClusterException, RedisError

        #: what a failure of the client looks like (OSError: a socket's own;
        #: RedisClusterException, which is no RedisError: no reachable seed node, a slot no
        #: master serves)
        self._failures: tuple[type[BaseException], ...] = (
            RedisError,
            RedisClusterException,
            OSError,
        )
        self.client: aioredis.Redis | RedisCluster
        self._cluster = bool(nodes)
        if nodes:
            self.client = _cluster_client(
                nodes, timeout=timeout, pool_size=pool_size, options=options
            )
            more = f" +{len(nodes) - 1}" if len(nodes) > 1 else ""
            #: how errors (and so logs) name Redis: never with the url's password
            self.shown_url = f"cluster {redacted_url(nodes[0])}{more}"
        else:
            self.client = aioredis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                max_connections=pool_size,
                # no retries inside an operation: the store's timeout bounds it as a whole, and
                # a `begin` sent again after a lost connection could find its own lock and
                # answer 409
                retry_on_timeout=False,
                retry=Retry(NoBackoff(), 0),
                **options,
            )
            self.shown_url = redacted_url(url)
        #: work it does in the background (tokens and locks given back): awaited a moment,
        #: then cancelled, when it closes
        self._background: set[asyncio.Task[None]] = set()
        #: writes kept trying: (record, tag) -> (until when, loop time; how to send it), and
        #: the one loop sending them
        self._retried: dict[tuple[str, str], tuple[float, Callable[[float], Awaitable[Any]]]] = {}
        self._retry_task: asyncio.Task[None] | None = None
        self._abandon: AsyncScript = self.client.register_script(_ABANDON)

    @classmethod
    def from_config(cls, config: StoreConfig, meter: StoreMeter | None = None) -> RedisStore:
        store = cls(
            config.name,
            config.url,
            nodes=config.nodes if config.cluster else (),
            prefix=config.prefix,
            timeout=config.timeout,
            pool_size=config.pool_size,
            tls=config.tls,
            meter=meter,
        )
        store.config = config
        return store

    async def ping(self) -> None:
        """Connect (when no connection is open) and PING: `StoreError` when Redis does not
        answer within the timeout."""
        await self.run(self.client.ping())

    def idempotency(
        self, *, namespace: str, max_keys: int, max_bytes: int, meter: RecordsMeter
    ) -> RedisIdempotencyRecords:
        """The records of one stage (`max_keys` and `max_bytes` bound the memory store only:
        see the module's docstring)."""
        return RedisIdempotencyRecords(self, namespace)

    def _part(self, key: str) -> str:
        """Which part of the store serves `key`: on a cluster the master of its slot (as the
        client last learnt the slots), else "" — the one Redis."""
        if not self._cluster or not key:
            return ""
        try:
            node = self.client.get_node_from_key(key)  # type: ignore[union-attr]
        except self._failures:  # the slots not read yet, or this one served by no master
            return ""
        return node.name if node is not None else ""

    async def run(self, operation: Awaitable[T], key: str = "") -> T:
        """`operation`'s reply, or `StoreError` when Redis failed or took longer than the
        store's timeout (a server paused or unreachable included).  After a failure the
        operations of the next back-off fail at once without trying (`BACKOFF_FIRST`, doubling
        with each failure up to `BACKOFF_MAX`): an outage costs one wait for the timeout per
        back-off, not one per request.  On a cluster the back-off is per master, found by the
        operation's `key`: a master down does not stop the keys the others serve."""
        started = clock()
        if self._closed:
            if isinstance(operation, Coroutine):
                operation.close()
            raise StoreError(f"store {self.name!r} ({self.shown_url}) is closed")
        part = self._part(key) if self._cluster else ""
        down = self._down.get(part) if self._down else None
        if down is not None and started < down[0]:
            if isinstance(operation, Coroutine):
                operation.close()  # never sent: not an un-awaited coroutine either
            self.meter.backoff.inc()
            where = f" (master {part})" if part else ""
            raise StoreError(
                f"store {self.name!r} ({self.shown_url}){where} is down, next attempt in"
                f" {(down[0] - started) * 1000:.0f} ms (last error: {self.last_error})"
            )
        # a request's stages may call this from a driven coroutine (gateway.core.waiter): the
        # timeout below, and redis-py's inside, need a task
        try:
            await into_task()
        except BaseException:
            if isinstance(operation, Coroutine):
                operation.close()  # cancelled on the way: never sent
            raise
        if self._closed:
            # closed in the turn the hand-over took (a reload retired the store): not sent, nor
            # a connection opened again under a client being closed
            if isinstance(operation, Coroutine):
                operation.close()
            raise StoreError(f"store {self.name!r} ({self.shown_url}) is closed")
        self._in_flight += 1
        try:
            async with asyncio.timeout(self.timeout):
                reply = await operation
        except TimeoutError as exc:
            error = StoreError(
                f"store {self.name!r} ({self.shown_url}): no answer within"
                f" {self.timeout * 1000:g} ms"
            )
            self._failed("timeout", error, started, part)
            raise error from exc
        except self._failures as exc:
            # redis-py's messages name the host and port, never the password
            error = StoreError(
                f"store {self.name!r} ({self.shown_url}): {type(exc).__name__}: {exc}"
            )
            self._failed("error", error, started, part)
            raise error from exc
        finally:
            self._in_flight -= 1
            if self._idle is not None and not self._in_flight:
                self._idle.set()
        meter = self.meter
        meter.duration.observe(clock() - started)
        meter.ok.inc()
        if down is not None or self.state != "up":
            self._answered(part)
        return reply

    def _answered(self, part: str) -> None:
        if self._down.pop(part, None) is not None:
            where = f" master {part}" if part else ""
            log.info("store %s (%s)%s answers again", self.name, self.shown_url, where)
        if not self._down:
            self.state = "up"
            self.last_error = None
            self.meter.up.set(1)

    def _failed(self, outcome: str, error: StoreError, started: float, part: str) -> None:
        meter = self.meter
        now = clock()
        meter.duration.observe(now - started)
        (meter.timeout if outcome == "timeout" else meter.error).inc()
        self.last_error = str(error)
        down = self._down.get(part)
        pause = BACKOFF_FIRST if down is None else down[1]
        self._down[part] = (now + pause, min(pause * 2, BACKOFF_MAX))
        if down is None:
            # once per outage (of each master): the stages log and count each request it costs
            log.warning("store %s is down: %s", self.name, error)
        if self.state != "down":
            self.state = "down"
            meter.up.set(0)

    def describe(self) -> dict[str, object]:
        """What /admin/stores shows (never the password)."""
        return {
            "name": self.name,
            "type": "redis",
            "url": self.shown_url,
            "prefix": self.prefix,
            "timeout_ms": self.timeout * 1000,
            "state": self.state,
            "last_error": self.last_error,
        }

    def rate_limiter(
        self, *, namespace: str, rate: float, per: float, burst: int, max_keys: int
    ) -> RedisRateLimiter:
        """The buckets of one stage, spent locally from leases (gateway.stores.redis_leases)."""
        return RedisRateLimiter(
            self,
            namespace,
            rate=rate,
            per=per,
            burst=burst,
            max_keys=max_keys,
            clock=asyncio.get_running_loop().time,
        )

    def give_up(self, name: str, owner: str, lock_ttl: float) -> None:
        """Give up the lock `owner` may hold on record `name` (a `begin` whose answer never
        came), in the background (`keep_trying`)."""
        self.keep_trying(
            name,
            lock_ttl,
            lambda left: self._abandon(keys=[name], args=[owner, _milliseconds(left)]),
            tag=owner,
        )

    def keep_trying(
        self,
        name: str,
        within: float,
        send: Callable[[float], Awaitable[Any]],
        tag: str = "",
    ) -> None:
        """Send a write on record `name` in the background until Redis takes it, for at most
        `within` seconds (`send(seconds left)` makes it).  Queued, and tried by one loop per
        store in order, backing off, so an outage costs one attempt per back-off and not one
        per request; a newer write to the same record (and `tag`) replaces a queued one.  At
        most MAX_RETRIED are queued: the oldest is dropped."""
        if self._closing:
            return  # nobody would send it
        loop = asyncio.get_running_loop()
        queued = self._retried
        queued.pop((name, tag), None)
        if len(queued) >= MAX_RETRIED:
            del queued[next(iter(queued))]
        queued[(name, tag)] = (loop.time() + within, send)
        if self._retry_task is None:
            self._retry_task = loop.create_task(self._send_queued())
            self._background.add(self._retry_task)
            self._retry_task.add_done_callback(self._background.discard)

    async def abandon(self, name: str, owner: str, lock_ttl: float) -> None:
        """One attempt at _ABANDON (its tombstone lives for `lock_ttl`)."""
        await self.run(self._abandon(keys=[name], args=[owner, _milliseconds(lock_ttl)]), name)

    async def _send_queued(self) -> None:
        """Try every queued write in turn (one failing does not hold up the others: on a
        cluster they may go to other masters); after a round with a failure, pause."""
        loop = asyncio.get_running_loop()
        queued = self._retried
        pause = self.timeout
        try:
            while queued and not self._closing:
                failed = False
                for entry in list(queued):
                    until, send = queued.get(entry, (0.0, None))
                    if send is None:
                        continue  # replaced or dropped meanwhile
                    left = until - loop.time()
                    if left > 0:
                        try:
                            await self.run(send(left), entry[0])
                        except StoreError:
                            failed = True
                            continue
                    if queued.get(entry, (0.0, None))[1] is send:
                        del queued[entry]
                if failed:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, BACKOFF_MAX)
                else:
                    pause = self.timeout
        finally:
            self._retry_task = None

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background until it ends or the store closes."""
        if self._closing:
            work.close()  # too late: the store's connections are closing
            return
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Let the background work (tokens given back at shutdown) finish within the store's
        timeout — twice, for a connection to open — cancel what is left, and disconnect.
        Bounded as a whole: a task that swallows its cancel (redis-py's `wait_for` can, under
        load, on Python 3.11) is left behind rather than holding up shutdown.  Once closed, an
        operation (a request that began before a reload replaced the store) fails at once
        rather than connecting again."""
        self._closing = True
        tasks = list(self._background)
        if tasks:
            await asyncio.wait(tasks, timeout=2 * self.timeout)
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=self.timeout)
            if stuck:
                log.warning("store %s: %d tasks did not stop when cancelled", self.name, len(stuck))
        self._closed = True
        if self._in_flight:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2 * self.timeout):
                    await self._idle.wait()
        try:
            async with asyncio.timeout(max(CLOSE_SECONDS, 2 * self.timeout)):
                await self.client.aclose()
        except TimeoutError:
            log.warning("store %s: its connections did not close in time", self.name)
