"""An upstream that fails at the TCP level on command and counts what it executed, by id.

Each request names its operation in `X-Test-Id` and the fault its *first* delivery meets in
`X-Fault` (later deliveries of the same id are answered normally: a transient fault, so a
retry or a repeat shows what it would do to a recovered upstream).  The faults, in the order
a request meets them:

- `reset_before_read`: the head is peeked, the request is not executed, the connection is reset;
- `reset_after_read`: executed, then reset before any byte of the response;
- `fin_before_head`: executed, then closed (FIN) before any byte of the response;
- `truncated_head`: executed, then half a status line and header, then FIN;
- `truncated_body`: executed, a 200 head announcing 1,000 bytes, 100 of them, then FIN;
- `reset_mid_body`: the same, then a reset;
- `stall_mid_body`: the same, then nothing more (until the gateway's body timeout closes it);
- `blackhole`: executed, never answered (until the gateway gives up and closes);
- `garbage`: executed, answered with bytes that are not HTTP;
- `status_502`, `status_503`, `status_504`: executed, answered with that status;
- anything else (or none): executed, 200 with `X-Executed-For`.

A refused connection is not a fault this server makes: point the gateway at a closed port.
Requests are read with their `Content-Length` body (the gateway sends small bodies framed that
way); `executions[id]` counts how many times the upstream ran the operation.  With `chaos`
set, a function picks the fault of every delivery instead (a soak).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from tests.support.raw_server import RawServer
from tests.support.wire_upstream import parse_head

FAULTS = (
    "reset_before_read",
    "reset_after_read",
    "fin_before_head",
    "truncated_head",
    "truncated_body",
    "reset_mid_body",
    "stall_mid_body",
    "blackhole",
    "garbage",
    "status_502",
    "status_503",
    "status_504",
)

_CUT_HEAD = b"HTTP/1.1 200 OK\r\nContent-Le"
_CUT_BODY = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"b" * 100
_GARBAGE = b"\x16\x03\x01 this is not HTTP\r\n\r\n"


class FaultServer(RawServer):
    def __init__(self) -> None:
        super().__init__()
        #: deliveries of each id (a reset before the read is a delivery, not an execution)
        self.deliveries: Counter[str] = Counter()
        #: how many times the upstream ran each operation
        self.executions: Counter[str] = Counter()
        #: when set, picks the fault of *every* delivery (a soak), whatever the request says
        self.chaos: Callable[[], str] | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await self._exchange(reader, writer):
            pass

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection is done."""
        _, lines = parse_head((await reader.readuntil(b"\r\n\r\n"))[:-4])
        headers = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in lines}
        test_id = headers.get("x-test-id", "")
        self.deliveries[test_id] += 1
        if self.chaos is not None:
            fault = self.chaos()
        else:
            fault = headers.get("x-fault", "") if self.deliveries[test_id] == 1 else ""
        if fault == "reset_before_read":
            _reset(writer)
            return False
        length = int(headers.get("content-length", "0"))
        if length:
            await reader.readexactly(length)
        self.executions[test_id] += 1
        if fault == "reset_after_read":
            _reset(writer)
            return False
        if fault == "fin_before_head":
            return False
        if fault == "blackhole":
            await reader.read()  # until the gateway closes its side
            return False
        if fault in (
            "truncated_head",
            "truncated_body",
            "reset_mid_body",
            "stall_mid_body",
            "garbage",
        ):
            writer.write(
                {
                    "truncated_head": _CUT_HEAD,
                    "truncated_body": _CUT_BODY,
                    "reset_mid_body": _CUT_BODY,
                    "stall_mid_body": _CUT_BODY,
                    "garbage": _GARBAGE,
                }[fault]
            )
            await writer.drain()
            if fault == "reset_mid_body":
                _reset(writer)
            elif fault == "stall_mid_body":
                await reader.read()  # until the gateway gives up on the body and closes
            elif writer.can_write_eof():
                writer.write_eof()  # FIN after what was sent; read on, so nothing resets it
                await reader.read()
            return False
        status = int(fault.removeprefix("status_")) if fault.startswith("status_") else 200
        body = f"ran {test_id}".encode()
        writer.write(
            b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nX-Executed-For: %s\r\n\r\n%s"
            % (status, len(body), test_id.encode(), body)
        )
        await writer.drain()
        return True


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST: SO_LINGER on, zero seconds."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@asynccontextmanager
async def fault_server() -> AsyncIterator[FaultServer]:
    server = FaultServer()
    await server.start()
    try:
        yield server
    finally:
        await server.close()
