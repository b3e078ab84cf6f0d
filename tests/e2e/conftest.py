"""Fixtures of the end-to-end tests: real `gateway run` processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateway_processes import Gateways


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Gateways]:
    """Gateways started by the test (two workers each), all stopped when it ends."""
    running = Gateways(tmp_path)
    try:
        yield running
    finally:
        running.stop_all()
