"""Listening sockets the gateway binds itself for an IP address (gateway.runtime.listen), as
asyncio would bind them: serving through uvloop, IPv6 apart from IPv4, SO_REUSEPORT when asked,
asyncio's error for an address in use, and host names left to the loop."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.runtime.listen import listening_socket


async def test_a_server_on_the_socket_serves() -> None:
    sock = listening_socket("127.0.0.1", 0, backlog=16)
    assert sock is not None
    assert not sock.getblocking()
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, sock=sock)
    port = sock.getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        assert await reader.read() == b"ping"
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_ipv6_is_ipv6_only_so_both_wildcards_take_one_port() -> None:
    v4 = listening_socket("0.0.0.0", 0, backlog=16)
    assert v4 is not None
    try:
        port = v4.getsockname()[1]
        v6 = listening_socket("::", port, backlog=16)
        assert v6 is not None
        try:
            assert v6.family == socket.AF_INET6
            assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
            assert v6.getsockname()[1] == port
        finally:
            v6.close()
    finally:
        v4.close()


def test_an_address_in_use_is_refused_in_asyncio_words_unless_the_port_is_shared() -> None:
    first = listening_socket("127.0.0.1", 0, backlog=16)
    assert first is not None
    try:
        port = first.getsockname()[1]
        with pytest.raises(
            OSError,
            match=r"error while attempting to bind on address "
            rf"\('127\.0\.0\.1', {port}\): address already in use",
        ):
            listening_socket("127.0.0.1", port, backlog=16)
    finally:
        first.close()
    shared = [listening_socket("127.0.0.1", 0, backlog=16, reuse_port=True)]
    assert shared[0] is not None
    try:
        port = shared[0].getsockname()[1]
        # workers: each binds the same port with SO_REUSEPORT
        shared.append(listening_socket("127.0.0.1", port, backlog=16, reuse_port=True))
        assert shared[1] is not None
        assert shared[1].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    finally:
        for sock in shared:
            if sock is not None:
                sock.close()


def test_a_host_name_is_left_to_the_loop() -> None:
    assert listening_socket("localhost", 0, backlog=16) is None
