"""Token buckets shared through Redis, spent locally from leases (SPEC §5.3).

The bucket of a key lives in Redis (a hash: tokens and the time they were counted, refilled by
Redis's own clock, so replicas' clocks never disagree).  A worker does not ask Redis for every
request: it reserves a **lease** — a few tokens taken out of the bucket by one atomic script —
and spends it locally, without a round trip.  Before the lease runs out it asks for the next
one in the background (at most one request to Redis in flight per key; requests that find the
lease empty meanwhile wait for that one answer rather than sending their own).

- **Lease size follows the key's rate here**: about `LEASE_SECONDS` of the requests this worker
  saw for the key, at most a quarter of the burst.  A slow key leases one token at a time and
  is exact (a request, a round trip); a hot key costs one round trip per lease.
- **The bound**: tokens leased are gone from the bucket, so over any time window the requests
  admitted by all workers and replicas together exceed what one bucket would admit by at most
  the tokens that were leased and not yet spent when the window began.
- **Unspent tokens go back**: when a key's lease has not been used for `IDLE_SECONDS`, when a
  key is evicted (`max_keys`), and when the limiter closes (shutdown, or a reload replacing
  the stage) — so they do not sit idle in one worker while others are refused.
- **Refused locally**: when Redis has no token for a key, the worker refuses the key's requests
  itself until the next token is due, instead of asking Redis again for each.
- `RateLimit` headers: the remaining count is this worker's unspent lease plus what Redis had
  left at its last answer; exact for a slow key, within the bound for a hot one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, final

from gateway.stores.base import StoreError, Verdict

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from gateway.stores.redis import RedisStore

#: a lease is sized to last about this long at the key's rate here
LEASE_SECONDS: Final = 0.1
#: a lease unused for this long is given back
IDLE_SECONDS: Final = 1.0
#: how many times a request waits for a new lease before it is refused (others took the tokens)
_ATTEMPTS: Final = 4

#: KEYS[1]: the bucket.  ARGV: tokens per second, burst, tokens wanted, tokens given back.
#: Refills by Redis's clock, adds what is given back, grants what it can of what is wanted.
#: Returns the grant, the whole tokens left, and the milliseconds until the bucket is full and
#: until the next whole token.  Lua numbers are doubles: a bucket's tokens are kept exactly.
_LEASE: Final = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local per_second = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1])
local at = tonumber(bucket[2])
if tokens == nil or at == nil then
  tokens = burst
elseif now > at then
  tokens = math.min(burst, tokens + (now - at) / 1000000 * per_second)
end
tokens = math.min(burst, tokens + tonumber(ARGV[4]))
local grant = math.min(tonumber(ARGV[3]), math.floor(tokens + 1e-9))
if grant < 0 then grant = 0 end
tokens = math.max(0, tokens - grant)
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', now)
local to_full = math.ceil((burst - tokens) / per_second * 1000)
redis.call('PEXPIRE', KEYS[1], to_full + 1000)
local to_token = 0
if tokens + 1e-9 < 1 then to_token = math.ceil((1 - tokens) / per_second * 1000) end
return {grant, math.floor(tokens + 1e-9), to_full, to_token}
"""


@final
class _Lease:
    """One key's lease in this worker."""

    __slots__ = (
        "denied_until",
        "refill",
        "remote",
        "requests",
        "since",
        "to_full",
        "tokens",
        "updated",
        "used",
        "waiting",
        "want",
    )

    def __init__(self, now: float) -> None:
        #: leased here and not spent
        self.tokens = 0
        #: whole tokens Redis had left at its last answer, and seconds until its bucket was full
        self.remote = 0
        self.to_full = 0.0
        #: when Redis last answered (loop time)
        self.updated = now
        #: Redis had no token: refused here until then
        self.denied_until = 0.0
        #: the request to Redis in flight for this key
        self.refill: asyncio.Task[None] | None = None
        #: requests waiting for it
        self.waiting = 0
        #: the tokens the next lease asks for
        self.want = 1
        #: requests seen since `since` (the key's rate here, for the lease size)
        self.requests = 0
        self.since = now
        #: when the lease was last used (idle leases are given back)
        self.used = now


@final
class RedisRateLimiter:
    """One rate-limit stage's buckets in a redis store, under `<prefix>rl:<namespace>:<key>`."""

    __slots__ = (
        "_burst",
        "_clock",
        "_latest",
        "_leases",
        "_max_keys",
        "_max_lease",
        "_per_second",
        "_prefix",
        "_script",
        "_store",
        "idle_seconds",
    )

    def __init__(
        self,
        store: RedisStore,
        namespace: str,
        *,
        rate: float,
        per: float,
        burst: int,
        max_keys: int,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._prefix = f"{store.prefix}rl:{namespace}:"
        self._per_second = rate / per
        self._burst = burst
        self._max_keys = max_keys
        #: a lease is at most a quarter of the bucket (unless more requests wait for it)
        self._max_lease = max(1, burst // 4)
        self._clock = clock
        #: a lease unused for this long is given back (IDLE_SECONDS)
        self.idle_seconds = IDLE_SECONDS
        #: leases by key, least recently used first; the last one spent from
        self._leases: dict[str, _Lease] = {}
        self._latest = ""
        self._script: AsyncScript = store.client.register_script(_LEASE)

    def take_now(self, key: str) -> Verdict | None:
        """A verdict without a round trip, when the key's lease (or a refusal) answers it;
        None when Redis must be asked (`take`)."""
        lease = self._leases.get(key)
        return None if lease is None else self._answer(key, lease)

    def _answer(self, key: str, lease: _Lease) -> Verdict | None:
        """What the lease answers now: a token spent, a refusal until the next token is due, or
        None when Redis must be asked."""
        now = self._clock()
        if lease.tokens > 0:
            self._spend(key, lease, now)
            return self._verdict(lease, True, now)
        if now < lease.denied_until:
            lease.requests += 1
            return self._verdict(lease, False, now)
        return None

    async def take(self, key: str) -> Verdict:
        verdict = self.take_now(key)
        if verdict is not None:
            return verdict
        lease = self._leases.get(key)
        now = self._clock()
        if lease is None:
            self._sweep(now)
            lease = self._leases[key] = _Lease(now)
            self._latest = key  # inserted last
        lease.waiting += 1
        try:
            for _ in range(_ATTEMPTS):
                refill = lease.refill
                if refill is None:
                    refill = lease.refill = self._start_refill(key, lease)
                # shielded: a request that gives up must not cancel the answer others wait for
                await asyncio.shield(refill)
                answered = self._answer(key, lease)
                if answered is not None:
                    return answered
            # the tokens granted went to the other waiters every time: refuse, briefly
            lease.requests += 1
            return Verdict(False, 0, lease.to_full, 1 / self._per_second)
        finally:
            lease.waiting -= 1

    def _spend(self, key: str, lease: _Lease, now: float) -> None:
        lease.tokens -= 1
        lease.requests += 1
        lease.used = now
        if key != self._latest:
            # most recently used last (a dict keeps insertion order); a hot key usually is.
            # Only while `lease` is still the key's: a limiter closed meanwhile (a reload, a
            # shutdown) no longer holds it, and a waiter's tokens are spent without it
            leases = self._leases
            if leases.get(key) is lease:
                del leases[key]
                leases[key] = lease
                self._latest = key
        if lease.refill is None and lease.want > 1 and lease.tokens <= lease.want // 2:
            lease.refill = self._start_refill(key, lease)

    def _start_refill(self, key: str, lease: _Lease) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._refill(key, lease))
        # a failure of a refill started ahead of need, that no request awaits, is not an
        # unhandled error: the next request that needs the lease asks again and gets it
        task.add_done_callback(_retrieve)
        return task

    async def _refill(self, key: str, lease: _Lease) -> None:
        """Ask Redis for the next lease; the answer updates `lease` (its tokens, or until when
        it is refused).  A failure reaches the requests waiting for it as `StoreError`."""
        try:
            now = self._clock()
            # the key's rate here since the last lease: a slow key's is far under one request
            # per LEASE_SECONDS (a lease of one: exact), a hot key's ramps up lease by lease
            elapsed = max(now - lease.since, 0.001)
            if lease.requests:
                rate_here = lease.requests / elapsed
                lease.want = max(1, min(self._max_lease, math.ceil(rate_here * LEASE_SECONDS)))
            lease.requests = 0
            lease.since = now
            want = max(lease.want, lease.waiting)
            name = self._prefix + key
            reply = await self._store.run(
                self._script(keys=[name], args=[self._per_second, self._burst, want, 0]), name
            )
            grant, remote, to_full, to_token = (int(x) for x in reply)
            now = self._clock()
            lease.tokens += grant
            lease.remote = remote
            lease.to_full = to_full / 1000
            lease.updated = now
            lease.denied_until = now + to_token / 1000 if grant == 0 else 0.0
        finally:
            lease.refill = None

    def _verdict(self, lease: _Lease, allowed: bool, now: float) -> Verdict:
        to_full = max(0.0, lease.to_full - (now - lease.updated))
        if allowed:
            return Verdict(True, lease.tokens + lease.remote, to_full, 0.0)
        return Verdict(False, 0, to_full, max(0.001, lease.denied_until - now))

    def _sweep(self, now: float) -> None:
        """Give back the least recently used leases idle for IDLE_SECONDS, and make room for a
        new key under max_keys."""
        leases = self._leases
        while leases:
            key, lease = next(iter(leases.items()))
            if len(leases) < self._max_keys and now - lease.used < self.idle_seconds:
                return
            if lease.refill is not None or lease.waiting:
                # in use right now (a refill under way, or requests woken by one and not yet
                # run): the next sweep
                return
            del leases[key]
            if key == self._latest:
                self._latest = ""
            self._give_back(key, lease)

    def _give_back(self, key: str, lease: _Lease) -> None:
        if lease.tokens > 0:
            count, lease.tokens = lease.tokens, 0
            self._store.spawn(self._return(key, count))

    async def _return(self, key: str, count: int) -> None:
        # a failure loses the tokens to the bucket until it refills: within the bound
        with contextlib.suppress(StoreError):
            name = self._prefix + key
            await self._store.run(
                self._script(keys=[name], args=[self._per_second, self._burst, 0, count]), name
            )

    def __len__(self) -> int:
        return len(self._leases)

    def leases(self) -> list[_Lease]:
        """The leases held here (for tests and introspection)."""
        return list(self._leases.values())

    def outstanding(self) -> int:
        """Tokens leased here and not spent."""
        return sum(lease.tokens for lease in self._leases.values())

    def close(self) -> None:
        """Give every unspent token back (in the background, on the store)."""
        leases, self._leases = self._leases, {}
        self._latest = ""
        for key, lease in leases.items():
            self._give_back(key, lease)


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
