"""What a Python user would write instead of a gateway: an aiohttp ClientSession proxy.

Run: python -m bench.aiohttp_proxy LISTEN_PORT UPSTREAM_URL
"""

from __future__ import annotations

import sys

from aiohttp import ClientSession, TCPConnector, web

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host", "content-length"}


def build(upstream: str) -> web.Application:
    app = web.Application()

    async def start(app: web.Application) -> None:
        app["session"] = ClientSession(connector=TCPConnector(limit=256))

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        body = await request.read()
        async with request.app["session"].request(
            request.method, upstream + request.path_qs, headers=headers, data=body
        ) as upstream_response:
            payload = await upstream_response.read()
            out = {k: v for k, v in upstream_response.headers.items() if k.lower() not in HOP}
            return web.Response(status=upstream_response.status, headers=out, body=payload)

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


if __name__ == "__main__":
    web.run_app(build(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), access_log=None)
