"""Conformance tests reuse the integration upstream and gateway fixtures."""

from tests.integration.conftest import gw, upstream

__all__ = ["gw", "upstream"]
