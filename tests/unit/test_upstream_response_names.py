"""How the upstream connection reads a response header's name: by the name as the upstream
spelled it (a cache per spelling, bounded), with the kind of its lower-case name."""

from __future__ import annotations

import pytest

from gateway.upstream import connection
from gateway.upstream.connection import _received_kind


@pytest.mark.parametrize(
    ("spelling", "kind"),
    [
        (b"Content-Length", connection._CONTENT_LENGTH),
        (b"CONTENT-LENGTH", connection._CONTENT_LENGTH),
        (b"Transfer-encoding", connection._TRANSFER_ENCODING),
        (b"connection", connection._CONNECTION),
        (b"Keep-Alive", connection._DROPPED),
        (b"X-REQUEST-ID", connection._DROPPED),
        (b"Upgrade", connection._UPGRADE),
        (b"Content-Type", connection._ORDINARY),
        (b"Content_Length", connection._ORDINARY),  # not a framing header: carried on as sent
    ],
)
def test_each_spelling_gets_its_lower_case_names_kind(spelling: bytes, kind: int) -> None:
    assert _received_kind(spelling) == kind
    assert connection._RECEIVED_KINDS[spelling] == kind


def test_the_spelling_cache_is_bounded_and_still_right() -> None:
    for i in range(10_000):
        _received_kind(b"X-Upstream-%d" % i)
    assert len(connection._RECEIVED_KINDS) <= 4096
    assert _received_kind(b"TRANSFER-ENCODING") == connection._TRANSFER_ENCODING
