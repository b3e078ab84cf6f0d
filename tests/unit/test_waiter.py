"""gateway.core.waiter: a Waiter is an asyncio future to a task and a direct wake-up to a
driver; ReadySteps resumes the woken together on the loop's next turn; `Continued` hands a
driven coroutine to a task mid-way; `into_task` gets a task for code that needs one.  The
connection's driver itself is tested over sockets (tests/integration/test_driven_requests.py)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from typing import Any, cast

import pytest

from gateway.core.waiter import Continued, ReadySteps, Waiter, into_task

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("test_waiter", default="unset")


async def test_a_task_awaits_a_waiter_as_it_would_a_future() -> None:
    loop = asyncio.get_running_loop()
    answered: Waiter[int] = Waiter(loop)
    failed: Waiter[int] = Waiter(loop)
    settled: Waiter[int] = Waiter(loop)
    tasks = [loop.create_task(_await(w)) for w in (answered, failed, settled)]
    await asyncio.sleep(0)  # each task now waits on its waiter
    answered.set_result(1)
    failed.set_exception(LookupError("no"))
    settled.settle(3)
    await asyncio.sleep(0)
    assert not tasks[2].done()  # settled but not woken: nobody told
    settled.wake()
    assert await tasks[0] == 1
    with pytest.raises(LookupError):
        await tasks[1]
    assert await tasks[2] == 3
    with pytest.raises(asyncio.InvalidStateError):
        answered.set_result(2)


async def test_a_done_waiter_is_not_waited_for() -> None:
    waiter: Waiter[str] = Waiter(asyncio.get_running_loop())
    waiter.settle("now")
    assert await waiter == "now"


async def test_cancelling_the_task_cancels_the_waiter_and_the_task_sees_it() -> None:
    loop = asyncio.get_running_loop()
    waiter: Waiter[int] = Waiter(loop)
    task = loop.create_task(_await(waiter))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert waiter.cancelled()
    waiter.settle(1)  # too late: changes nothing
    assert waiter.cancelled()


async def test_wait_for_times_a_waiter_out() -> None:
    waiter: Waiter[int] = Waiter(asyncio.get_running_loop())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(waiter, 0.01)
    assert waiter.cancelled()


async def test_a_driver_is_woken_at_once_by_wake_and_on_the_next_turn_otherwise() -> None:
    loop = asyncio.get_running_loop()
    woken: list[str] = []
    direct: Waiter[int] = Waiter(loop)
    direct.driver = lambda: woken.append("direct")
    direct.settle(1)
    assert woken == []
    direct.wake()
    assert woken == ["direct"]
    direct.wake()  # once only
    assert woken == ["direct"]

    for name, end in (
        ("result", lambda w: w.set_result(1)),
        ("error", lambda w: w.set_exception(LookupError())),
        ("cancel", lambda w: w.cancel()),
    ):
        waiter: Waiter[int] = Waiter(loop)
        waiter.driver = lambda name=name: woken.append(name)  # type: ignore[misc]
        end(waiter)
        assert woken[-1] != name  # never inside the caller's frame
        await asyncio.sleep(0)
        assert woken[-1] == name
    assert woken == ["direct", "result", "error", "cancel"]


async def test_a_driven_coroutine_handed_to_a_task_goes_on_in_its_context() -> None:
    loop = asyncio.get_running_loop()
    first: Waiter[str] = Waiter(loop)
    later: asyncio.Future[str] = loop.create_future()
    seen: list[str] = []

    async def request() -> str:
        VAR.set("set while driven")
        seen.append(await first)
        seen.append(await later)  # not a Waiter: the driver hands the rest to a task
        seen.append(VAR.get())
        return "done"

    context = contextvars.copy_context()
    coro = request()
    pending = context.run(coro.send, None)
    assert pending is first
    first.settle("first")
    pending = context.run(coro.send, None)  # what the driver does when woken
    assert pending is later
    task = loop.create_task(_continued(coro, pending), context=context)
    await asyncio.sleep(0)
    assert not task.done()
    later.set_result("later")
    assert await task == "done"
    assert seen == ["first", "later", "set while driven"]


async def test_a_task_cancelled_before_its_first_step_cancels_the_coroutine() -> None:
    loop = asyncio.get_running_loop()
    later: asyncio.Future[None] = loop.create_future()
    unwound: list[str] = []

    async def request() -> None:
        try:
            await later
        except asyncio.CancelledError:
            unwound.append("cancelled")
            raise

    coro = request()
    task = loop.create_task(_continued(coro, coro.send(None)))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert unwound == ["cancelled"]


async def test_into_task_hands_a_driven_coroutine_to_a_task() -> None:
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[Any] | None] = []

    async def stage() -> None:
        tasks.append(asyncio.current_task())
        await into_task()
        tasks.append(asyncio.current_task())
        await into_task()  # already in one: no turn of the loop
        tasks.append(asyncio.current_task())

    coro = stage()
    # driven from a callback, outside any task
    pending: list[object] = []
    loop.call_soon(lambda: pending.append(coro.send(None)))
    await asyncio.sleep(0)
    assert tasks == [None]
    task = loop.create_task(_continued(coro, pending[0]))
    await task
    assert tasks[1:] == [task, task]


async def _await(waiter: Waiter[int]) -> int:
    return await waiter


def _continued(coro: Coroutine[Any, None, Any], pending: object) -> Coroutine[Any, None, Any]:
    return cast(Coroutine[Any, None, Any], Continued(coro, pending))


async def test_ready_steps_run_together_on_the_loop_s_next_turn_in_order() -> None:
    ready = ReadySteps(asyncio.get_running_loop())
    ran: list[int] = []

    def second() -> None:
        ran.append(2)
        ready.add(lambda: ran.append(4))  # woken while the others run: the turn after

    ready.add(lambda: ran.append(1))
    ready.add(second)
    ready.add(lambda: ran.append(3))
    assert ran == []  # never inside the caller's frame
    await asyncio.sleep(0)
    assert ran == [1, 2, 3]
    await asyncio.sleep(0)
    assert ran == [1, 2, 3, 4]


async def test_a_run_cut_short_leaves_the_remaining_steps_for_the_next_turn() -> None:
    ready = ReadySteps(asyncio.get_running_loop())
    ran: list[str] = []

    def interrupted() -> None:
        raise KeyboardInterrupt

    ready.add(lambda: ran.append("before"))
    ready.add(interrupted)
    ready.add(lambda: ran.append("after"))
    with pytest.raises(KeyboardInterrupt):
        ready._run()  # as the loop would, interrupted by the second step
    assert ran == ["before"]
    await asyncio.sleep(0)
    assert ran == ["before", "after"]
