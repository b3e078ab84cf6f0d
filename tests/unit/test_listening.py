"""Stopping a listening socket without resetting what the kernel accepted, on real sockets on
127.0.0.1 (gateway/downstream/listening.py)."""

from __future__ import annotations

import errno
import select
import socket
import sys

import pytest

from gateway.downstream.listening import accept_pending, refuse_new_handshakes

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_ATTACH_FILTER is Linux's")


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)  # as an event loop's listening socket is
    return sock


def test_new_handshakes_are_dropped_and_queued_connections_accepted_by_hand() -> None:
    with _listening() as listener:
        address = listener.getsockname()
        # the kernel completes this handshake and queues it; the client sends its request
        queued = socket.create_connection(address, timeout=5)
        queued.sendall(b"request")
        assert refuse_new_handshakes(listener)
        late = socket.socket()
        late.setblocking(False)
        try:
            assert late.connect_ex(address) == errno.EINPROGRESS
            # a dropped SYN gets no answer at all, neither accepted nor refused (its client
            # sends it again a second later, when the listener is gone)
            assert select.select([], [late], [], 0.3)[1] == []
            accepted = accept_pending(listener)
            assert len(accepted) == 1
            with accepted[0] as conn:
                conn.settimeout(5)
                assert conn.recv(16) == b"request"
                # an accepted socket inherits the filter, which drops nothing it receives
                conn.sendall(b"answer")
                assert queued.recv(16) == b"answer"
            assert accept_pending(listener) == []  # and never blocks on an empty queue
        finally:
            late.close()
            queued.close()


def test_without_the_filter_new_handshakes_complete() -> None:
    """The check above can fail: the same connect succeeds on a listener left alone."""
    with _listening() as listener:
        late = socket.socket()
        late.setblocking(False)
        try:
            assert late.connect_ex(listener.getsockname()) == errno.EINPROGRESS
            assert select.select([], [late], [], 5)[1] == [late]
            assert late.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            accepted = accept_pending(listener)
            for conn in accepted:
                conn.close()
            assert len(accepted) == 1
        finally:
            late.close()
