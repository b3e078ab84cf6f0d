"""The config loader as the gateway calls it: with every registered stage kind."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from gateway.config import load
from gateway.config.model import GatewayConfig
from gateway.errors import ConfigErrors
from gateway.stages.registry import KINDS


def parse_config(
    text: str,
    *,
    source: str = "",
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> GatewayConfig:
    return load.parse_config(text, KINDS, source=source, base_dir=base_dir, env=env)


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> GatewayConfig:
    return load.load_config(path, KINDS, env=env)


#: the smallest config a stage's tests add routes to: one listener and one upstream, `u`
MINIMAL = """
listeners: [{name: http, bind: "127.0.0.1:8080"}]
upstreams:
  u: {endpoints: [{url: "http://127.0.0.1:9001"}]}
"""


def config_errors(
    text: str, *, env: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> list[str]:
    """The messages `parse_config` refuses `text` with (the test fails if it loads)."""
    with pytest.raises(ConfigErrors) as info:
        parse_config(text, env=env or {}, base_dir=base_dir)
    return [str(e) for e in info.value.errors]
