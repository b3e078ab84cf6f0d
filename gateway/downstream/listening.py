"""Stopping a listening socket without resetting a connection the kernel already accepted.

Closing a listening TCP socket resets every connection still in its accept queue, and every
handshake still under way — clients whose `connect()` had succeeded and who had perhaps sent
their request (with SO_REUSEPORT each worker's socket has a queue of its own: closing one does
not hand its queue to the others).  asyncio and uvloop can only stop accepting by closing the
socket, so a drain does it in three steps:

1. `refuse_new_handshakes`: a classic BPF filter on the listening socket drops every new SYN
   (the kernel runs a listener's filter on each packet that reaches it).  Nothing new enters the
   queue, yet the ACKs (or first data) of handshakes already under way still pass, so those
   complete, and the event loop goes on accepting them.  A client whose SYN was dropped sends it
   again about a second later: by then the socket is closed and it gets a refusal — or another
   process listening on the port (a new gateway, with SO_REUSEPORT) answers it.
2. `accept_pending`: whatever is still queued is accepted here, in the same step as the close.
3. the socket is closed; the accepted sockets are served like any other connection.

A connection accepted after step 1 inherits the filter (the kernel copies a listener's filter
to the sockets it accepts); it drops nothing an established connection receives.

Linux only (SO_ATTACH_FILTER); elsewhere step 1 reports False and only step 2 narrows the race.
Run once per listener per drain: nothing here is on the request path.
"""

from __future__ import annotations

import ctypes
import os
import socket
from typing import Protocol

#: <linux/filter.h>; Python's socket module does not name it
_SO_ATTACH_FILTER = 26
#: classic BPF opcodes (<linux/bpf_common.h>)
_LD_B_ABS = 0x00 | 0x10 | 0x20
_ALU_AND_K = 0x04 | 0x50
_JMP_JEQ_K = 0x05 | 0x10
_RET_K = 0x06
#: TCP header flags; a listener's filter sees the TCP header at offset 0
_TCP_FLAGS_OFFSET = 13
_SYN = 0x02
_ACK = 0x10


class _SockFilter(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter)))


#: drop a segment with SYN set and ACK not set (a new handshake); keep everything else
_DROP_NEW_HANDSHAKES = (_SockFilter * 5)(
    _SockFilter(_LD_B_ABS, 0, 0, _TCP_FLAGS_OFFSET),
    _SockFilter(_ALU_AND_K, 0, 0, _SYN | _ACK),
    _SockFilter(_JMP_JEQ_K, 0, 1, _SYN),
    _SockFilter(_RET_K, 0, 0, 0),
    _SockFilter(_RET_K, 0, 0, 0xFFFFFFFF),
)


class ListeningSocket(Protocol):
    """What asyncio's and uvloop's servers expose of their sockets."""

    def fileno(self) -> int: ...

    def setsockopt(self, level: int, option: int, value: bytes, /) -> None: ...


def refuse_new_handshakes(sock: ListeningSocket) -> bool:
    """Make the kernel drop new SYNs to `sock`; False where that is not possible."""
    program = _SockFprog(
        len(_DROP_NEW_HANDSHAKES), ctypes.cast(_DROP_NEW_HANDSHAKES, ctypes.POINTER(_SockFilter))
    )
    try:
        # the kernel copies the program: the buffer need not outlive the call
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, bytes(program))
    except OSError:
        return False
    return True


def accept_pending(sock: ListeningSocket) -> list[socket.socket]:
    """Accept every connection waiting in `sock`'s queue, without blocking."""
    # a duplicate descriptor shares the listening socket (and its O_NONBLOCK) with the loop
    listener = socket.socket(fileno=os.dup(sock.fileno()))
    accepted: list[socket.socket] = []
    try:
        listener.setblocking(False)
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return accepted
            except ConnectionAbortedError:
                continue  # it went away while queued
            except OSError:
                # e.g. EMFILE: serve what we have; the rest are reset with the close
                return accepted
            accepted.append(conn)
    finally:
        listener.close()
