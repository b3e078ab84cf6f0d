"""The idempotency tests' config (one keyed route, built by config_builder) and their clients
(keyed POSTs, raw bytes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.raw import RawResponse, close_writer, exchange, open_raw, read_response


def idempotency_config(
    urls: list[str],
    stage: Mapping[str, Any] | None = None,
    *,
    before: Sequence[Mapping[str, Any]] = (),
    after: Sequence[Mapping[str, Any]] = (),
    timeout: str = "500ms",
    **sections: Any,
) -> str:
    """One route `pay` on `urls`: the `before` stages, `idempotency: <stage>`, then `after`.

    `sections` are top-level sections (listeners, trusted_proxies …); `timeout` is the
    upstream's response_header timeout.
    """
    pipeline = [*before, {"idempotency": stage or {}}, *after]
    return gateway_yaml(
        upstreams={"app": upstream_to(*urls, timeouts={"response_header": timeout})},
        routes=[route("pay", "app", pipeline=pipeline)],
        **sections,
    )


def keyed_post(
    key: str | None, body: bytes = b"amount=10", path: str = "/pay", headers: str = ""
) -> bytes:
    """A POST with `Idempotency-Key: key` (none when None) and `headers` (CRLF-terminated)."""
    key_header = f"Idempotency-Key: {key}\r\n" if key is not None else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: {len(body)}\r\n"
        f"{key_header}{headers}\r\n"
    )
    return head.encode() + body


async def post(
    port: int, key: str | None, body: bytes = b"amount=10", path: str = "/pay", headers: str = ""
) -> RawResponse:
    """One keyed POST on a fresh connection."""
    return await exchange(port, keyed_post(key, body, path, headers))


async def post_each(port: int, keys: Iterable[str], path: str = "/pay") -> list[RawResponse]:
    """A keyed POST per key, one after the other on one kept-alive connection; each names its
    key as its X-Test-Id, so the upstream counts executions by key."""
    reader, writer = await open_raw(port)
    responses = []
    try:
        for key in keys:
            writer.write(keyed_post(key, path=path, headers=f"X-Test-Id: {key}\r\n"))
            responses.append(await asyncio.wait_for(read_response(reader), 5))
    finally:
        await close_writer(writer)
    return responses


def code(response: RawResponse) -> str:
    """The problem+json `code` of a gateway error."""
    return str(json.loads(response.body)["code"])


def detail(response: RawResponse) -> str:
    return str(json.loads(response.body)["detail"])
