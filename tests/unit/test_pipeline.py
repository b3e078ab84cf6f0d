"""compose(): stages run like an onion around the terminal handler."""

from __future__ import annotations

from collections.abc import Awaitable

from gateway.http.messages import Response
from gateway.pipeline import Next, RequestContext, compose
from tests.support.context import make_context


class Recorder:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Response:
        self.log.append(f"in:{self.name}")
        response = await call_next(ctx)
        self.log.append(f"out:{self.name}")
        response.headers.append((b"X-Stage", self.name.encode()))
        return response


class ShortCircuit:
    async def __call__(self, ctx: RequestContext, call_next: Next) -> Response:
        return Response(429, [])


async def test_onion_order() -> None:
    log: list[str] = []

    async def terminal(ctx: RequestContext) -> Response:
        log.append("terminal")
        return Response(200, [])

    handler = compose([Recorder("a", log), Recorder("b", log)], terminal)
    ctx = make_context()
    response = await handler(ctx)
    assert log == ["in:a", "in:b", "terminal", "out:b", "out:a"]
    assert response.headers == [(b"X-Stage", b"b"), (b"X-Stage", b"a")]


async def test_a_stage_can_answer_without_calling_next() -> None:
    called: list[bool] = []

    async def terminal(ctx: RequestContext) -> Response:
        called.append(True)
        return Response(200, [])

    handler = compose([ShortCircuit()], terminal)
    ctx = make_context()
    assert (await handler(ctx)).status == 429
    assert called == []


async def test_outcomes_name_each_stage_once_with_its_last_decision() -> None:
    ctx = make_context()
    assert ctx.outcomes is None
    ctx.outcome("cors", "allowed")
    ctx.outcome("ip_filter", "allowed")
    ctx.outcome("retry", "retried")
    ctx.outcome("retry", "budget_exhausted")  # a stage deciding again: its last word stands
    assert ctx.outcomes == {"cors": "allowed", "ip_filter": "allowed", "retry": "budget_exhausted"}
    assert list(ctx.outcomes) == ["cors", "ip_filter", "retry"]


class Outermost(Recorder):
    """A stage that can leave its response edit to the connection when it is first."""

    def outermost(self, ctx: RequestContext, call_next: Next) -> Awaitable[Response]:
        self.log.append(f"outermost:{self.name}")
        return call_next(ctx)


async def test_only_the_first_stage_is_called_through_outermost() -> None:
    """The first stage's `outermost` runs in its place (nothing is outside it to see the
    response first: pipeline.ResponseEdit); the same kind of stage further in is awaited as
    usual, since the stages in front of it see the response it returns."""
    log: list[str] = []

    async def terminal(ctx: RequestContext) -> Response:
        log.append("terminal")
        return Response(200, [])

    handler = compose([Outermost("a", log), Outermost("b", log)], terminal)
    await handler(make_context())
    assert log == ["outermost:a", "in:b", "terminal", "out:b"]
