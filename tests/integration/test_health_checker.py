"""The active checker against real sockets: passes, 5xx, hangs, refusals, and stopping."""

from __future__ import annotations

import asyncio

from gateway.config.model import HealthCheckConfig
from gateway.upstream.health import HealthChecker
from tests.support.faulty import closed_port, faulty_upstreams
from tests.support.process import async_wait_until

FAST = HealthCheckConfig(path="/healthz", interval=0.05, timeout=0.2, healthy=2, unhealthy=2)


class Changes:
    """on_change calls, awaitable."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bool]] = []
        self._event = asyncio.Event()

    def __call__(self, index: int, healthy: bool) -> None:
        self.seen.append((index, healthy))
        self._event.set()

    async def next(self) -> tuple[int, bool]:
        await asyncio.wait_for(self._event.wait(), 5)
        self._event.clear()
        return self.seen[-1]


async def test_failing_and_recovering_endpoint() -> None:
    async with faulty_upstreams("a") as [up]:
        changes = Changes()
        checker = HealthChecker(asyncio.get_running_loop(), FAST, [("127.0.0.1", up.port)], changes)
        checker.start()
        try:
            await async_wait_until(lambda: up.health_checks >= 3, within=5, what="checks")
            assert checker.healthy(0)
            assert changes.seen == []
            up.health = "fail"
            assert await changes.next() == (0, False)
            assert checker.last_error(0) == "status 503"
            up.health = "ok"
            assert await changes.next() == (0, True)
            assert checker.last_error(0) is None
        finally:
            checker.close()


async def test_hang_is_a_timeout_and_refusal_a_failure() -> None:
    async with faulty_upstreams("a") as [up]:
        up.health = "hang"
        changes = Changes()
        targets = [("127.0.0.1", up.port), ("127.0.0.1", closed_port())]
        checker = HealthChecker(asyncio.get_running_loop(), FAST, targets, changes)
        checker.start()
        try:
            first, second = await changes.next(), await changes.next()
            assert {first, second} == {(0, False), (1, False)}
            assert checker.last_error(0) == "timeout"
            assert checker.last_error(1) == "connection refused"
        finally:
            checker.close()


async def test_close_stops_probing() -> None:
    async with faulty_upstreams("a") as [up]:
        checker = HealthChecker(
            asyncio.get_running_loop(), FAST, [("127.0.0.1", up.port)], lambda i, h: None
        )
        checker.start()
        await async_wait_until(lambda: up.health_checks >= 2, within=5, what="checks")
        checker.close()
        await asyncio.sleep(0)
        count = up.health_checks
        # proving that nothing happens needs time to pass: several intervals
        await asyncio.sleep(FAST.interval * 4)
        assert up.health_checks == count
        checker.close()  # idempotent
