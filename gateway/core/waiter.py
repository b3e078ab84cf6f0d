"""A request's two waits without asyncio's futures and task wake-ups.

A keep-alive request waits twice: for its head to arrive on the client connection, and for the
upstream's answer.  With asyncio futures and a task, each wait costs a future (uvloop's
`create_future`, ~1.4k instructions), a `set_result` that schedules the task through
`call_soon` (~1.5k), and the loop running that handle into the task's step (~1.3k): ~8k of a
bare request's ~52k (callgrind).

`Waiter` is that wait made cheap.  A protocol callback that sees the event (`data_received`)
settles it, and `wake`s it once llhttp has returned and the protocol's state is whole.  Awaited
by a coroutine a driver runs (the downstream connection's request loop), the wake-up calls the
driver, which queues the coroutine on the listener's `ReadySteps`: every coroutine woken in one
turn of the loop is resumed together after that turn's I/O callbacks, as tasks would be, for
one loop handle per turn.  Awaited inside an asyncio task, a Waiter behaves like an asyncio
future (the task's step speaks to it through the future protocol), so the same code runs
either way.

A driven coroutine that awaits anything else (a body's next bytes, a new upstream connection, a
drain) is handed to a task, which runs the rest of it (`Continued`): the driver only ever
shortens the common path, it never has to do a task's work.  Code that needs a task of its own
(`asyncio.timeout`) asks for one first (`into_task`).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Final, Generic, TypeVar, cast, final

_PENDING: Final = 0
_DONE: Final = 1
_CANCELLED: Final = 2

T = TypeVar("T")
Callback = Callable[[Any], object]


@final
class Waiter(Generic[T]):
    """One result, awaited once; an asyncio future to the tasks that await it.

    `settle` records the result without telling anyone; `wake` then tells the awaiting driver
    (at once) or task (through the loop, as a future would).  `set_result`, `set_exception`
    and `cancel` do both, the wake-up always through the loop: they are safe from anywhere.
    """

    __slots__ = (
        "_asyncio_future_blocking",
        "_callbacks",
        "_exception",
        "_loop",
        "_result",
        "_state",
        "driver",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._state = _PENDING
        self._result: T | None = None
        self._exception: BaseException | None = None
        self._callbacks: list[tuple[Callback, contextvars.Context | None]] | None = None
        #: the driver's resume, set when a driver (not a task) awaits this
        self.driver: Callable[[], None] | None = None
        #: the future protocol's flag: set while yielded by `await`, cleared by the awaiter
        self._asyncio_future_blocking = False

    # -- the producer's side -----------------------------------------------------------------

    def settle(self, result: T) -> None:
        """Record the result; whoever awaits learns of it at `wake`."""
        if self._state == _PENDING:
            self._state = _DONE
            self._result = result

    def wake(self) -> None:
        """Tell the awaiter: its driver now (which queues it: ReadySteps), a task through the
        loop."""
        driver = self.driver
        if driver is not None:
            self.driver = None
            driver()
        elif self._callbacks is not None:
            self._schedule()

    def set_result(self, result: T) -> None:
        if self._state != _PENDING:
            raise asyncio.InvalidStateError("the result is already set")
        self._state = _DONE
        self._result = result
        self._schedule()

    def set_exception(self, exception: BaseException) -> None:
        if self._state != _PENDING:
            raise asyncio.InvalidStateError("the result is already set")
        self._state = _DONE
        self._exception = exception
        self._schedule()

    def cancel(self, msg: object = None) -> bool:
        if self._state != _PENDING:
            return False
        self._state = _CANCELLED
        self._schedule()
        return True

    def _schedule(self) -> None:
        """The awaiter learns of it on the loop's next turn (never inside a caller's frame)."""
        loop = self._loop
        driver = self.driver
        if driver is not None:
            self.driver = None
            loop.call_soon(driver)
        callbacks = self._callbacks
        if callbacks is not None:
            self._callbacks = None
            for callback, context in callbacks:
                loop.call_soon(callback, self, context=context)

    # -- the future protocol (asyncio tasks, asyncio.wait …) ---------------------------------

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def result(self) -> T:
        state = self._state
        if state == _DONE:
            if self._exception is not None:
                raise self._exception
            return cast(T, self._result)
        if state == _CANCELLED:
            raise asyncio.CancelledError()
        raise asyncio.InvalidStateError("the result is not set")

    def exception(self) -> BaseException | None:
        state = self._state
        if state == _DONE:
            return self._exception
        if state == _CANCELLED:
            raise asyncio.CancelledError()
        raise asyncio.InvalidStateError("the result is not set")

    def add_done_callback(
        self, callback: Callback, *, context: contextvars.Context | None = None
    ) -> None:
        if self._state != _PENDING:
            self._loop.call_soon(callback, self, context=context)
            return
        if self._callbacks is None:
            self._callbacks = [(callback, context)]
        else:
            self._callbacks.append((callback, context))

    def remove_done_callback(self, callback: Callback) -> int:
        callbacks = self._callbacks
        if not callbacks:
            return 0
        kept = [(c, x) for c, x in callbacks if c != callback]
        self._callbacks = kept or None
        return len(callbacks) - len(kept)

    def __await__(self) -> Generator[Any, None, T]:
        if self._state == _PENDING:
            self._asyncio_future_blocking = True
            yield self
        return self.result()


@final
class Continued:
    """The rest of a coroutine that has yielded `pending` to its driver, as a coroutine for
    `loop.create_task`: the task first gets `pending` (the future the coroutine awaits, or a
    bare yield), then every send and throw goes to the coroutine — as if the task had run it
    from the start.  A task cancelled before its first step throws into the coroutine too."""

    __slots__ = ("_coro", "_pending", "_started")

    def __init__(self, coro: Coroutine[Any, None, None], pending: object) -> None:
        self._coro = coro
        self._pending = pending
        self._started = False

    def __await__(self) -> Continued:
        return self

    def __iter__(self) -> Continued:
        return self

    def __next__(self) -> object:
        return self.send(None)

    def send(self, value: None) -> object:
        if not self._started:
            self._started = True
            return self._pending
        return self._coro.send(value)

    def throw(self, *exc: Any) -> object:
        self._started = True
        return self._coro.throw(*exc)

    def close(self) -> None:
        self._coro.close()


@final
class ReadySteps:
    """Driven coroutines to resume, run together on the loop's next turn.

    A wake-up found by an I/O callback (a request parsed, an upstream head read) is not acted on
    inside that callback: the loop first runs the rest of this turn's I/O callbacks, then
    resumes every coroutine woken — the order an asyncio task's wake-up (`call_soon`) gives,
    at one loop handle per turn instead of a future, a handle and a task step per wake-up.
    Resuming each request inside the callback that woke it counts fewer instructions (42.9k
    against 44.2k a request, callgrind) but ran slower under load than even futures and tasks
    (0.91 times their requests per second): parsing and writing interleaved lose the caches'
    warmth and the grouping of socket writes (bench/README.md)."""

    __slots__ = ("_loop", "_scheduled", "_steps")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._steps: list[Callable[[], None]] = []
        self._scheduled = False

    def add(self, step: Callable[[], None]) -> None:
        self._steps.append(step)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        steps = self._steps
        self._steps = []
        done = 0
        try:
            for step in steps:
                done += 1
                step()  # a step logs its own failures (HttpConnection._step)
        finally:
            if done < len(steps):
                # interrupted (KeyboardInterrupt …): the others still get their turn
                for step in steps[done:]:
                    self.add(step)


async def into_task() -> None:
    """Go on in an asyncio task: a driven coroutine — which is not one — is handed to a task
    here, by one turn of the loop.  For code that needs `asyncio.current_task()`
    (`asyncio.timeout`, redis-py's own timeouts), which a request's stages may reach."""
    if asyncio.current_task() is None:
        await asyncio.sleep(0)
