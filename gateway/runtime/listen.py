"""Listening sockets for an IP address, bound here rather than by the event loop.

Given a host, uvloop's `create_server` resolves it with getaddrinfo on libuv's thread pool —
even an address such as 127.0.0.1 — and the pool's four threads then idle for the life of the
process, which costs every system call the serving process makes afterwards
(gateway.runtime.threads).  A bind address is nearly always an IP address, so the socket is
made here, as asyncio would make it (SO_REUSEADDR; an IPv6 socket IPv6-only, so `::` and
`0.0.0.0` are two listeners; SO_REUSEPORT when asked), and handed to `create_server(sock=)`.
A host name is left to the loop (`listening_socket` answers None).
"""

from __future__ import annotations

import ipaddress
import socket


def listening_socket(
    host: str, port: int, *, backlog: int, reuse_port: bool = False
) -> socket.socket | None:
    """A non-blocking socket listening on `host`:`port`, or None when `host` is not an IP
    address.  Raises OSError as asyncio does when the address cannot be bound."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            # asyncio's wording, which operators and our logs already know
            raise OSError(
                exc.errno,
                f"error while attempting to bind on address {(host, port)!r}: "
                f"{(exc.strerror or '').lower()}",
            ) from None
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
