"""gateway_requests_total over real sockets: each request counted under its own method and
status, however they alternate on one keep-alive connection (the route remembers the child of
the last pair it counted)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support.config_builder import gateway_yaml, route, upstream_to
from tests.support.faulty import faulty_upstreams
from tests.support.gateway import port_of, running_gateway
from tests.support.metrics import labelled, scrape
from tests.support.raw import close_writer, read_response


async def test_alternating_methods_and_statuses_are_each_counted_as_themselves(
    tmp_path: Path,
) -> None:
    async with faulty_upstreams("app") as [up]:
        config = gateway_yaml(
            upstreams={"app": upstream_to(up.url)},
            routes=[route("app", "app", methods=["GET", "POST"])],
        )
        async with running_gateway(tmp_path, config) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
            sent = [
                ("GET", "ok"),
                ("GET", "ok"),
                ("GET", "status:503"),
                ("GET", "status:503"),
                ("POST", "status:503"),
                ("POST", "ok"),
                ("GET", "ok"),
                ("GET", "status:404"),
                ("POST", "ok"),
            ]
            statuses = []
            try:
                for method, mode in sent:
                    up.mode = mode
                    writer.write(
                        f"{method} /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n".encode()
                    )
                    await writer.drain()
                    statuses.append((await asyncio.wait_for(read_response(reader), 5)).status)
            finally:
                await close_writer(writer)
            samples = await scrape(gw)
    assert statuses == [200, 200, 503, 503, 503, 200, 200, 404, 200]
    counted = {
        (labels["method"], labels["code"]): count
        for key, count in labelled(samples, "gateway_requests_total").items()
        if (labels := dict(key))["route"] == "app"
    }
    assert counted == {
        ("GET", "200"): 3,
        ("GET", "503"): 2,
        ("POST", "503"): 1,
        ("POST", "200"): 2,
        ("GET", "404"): 1,
    }
