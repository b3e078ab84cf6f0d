"""The config loader as the gateway calls it: with every registered stage kind."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from gateway.config import load
from gateway.config.model import GatewayConfig
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
