"""The warning for an admin API without a token on a reachable address: which binds count as
loopback (tested without binding anything beyond 127.0.0.1)."""

from __future__ import annotations

import pytest

from gateway.app import is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("admin.internal", False),
    ],
)
def test_which_admin_binds_are_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
