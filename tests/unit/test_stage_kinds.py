"""Every registered stage kind: its documented example (the README's "Stage examples" block,
kept equal to each module's `EXAMPLE`) parses, and the registry is what the loader knows."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from gateway.config.reader import Reader
from gateway.stages.registry import KINDS
from tests.support.config import parse_config

README = Path(__file__).parents[2] / "README.md"
MARKER = "<!-- stage examples"

BASE = """
listeners: [{name: http, bind: "127.0.0.1:8080"}]
upstreams:
  u: {endpoints: [{url: "http://127.0.0.1:9001"}]}
  orders-shadow: {endpoints: [{url: "http://127.0.0.1:9002"}]}
"""


def examples_block() -> str:
    """The README block as it must read: every kind's EXAMPLE, as a named middleware."""
    lines = ["```yaml", "middlewares:"]
    for name, kind in KINDS.items():
        lines += [f"  {name}-example:", f"    {name}:"]
        lines.append(textwrap.indent(kind.example, "      ").rstrip("\n"))
    return "\n".join([*lines, "```"])


def test_the_readme_shows_every_kinds_example() -> None:
    text = README.read_text()
    start = text.index("\n", text.index(MARKER)) + 1
    shown = text[start : text.index("```\n", start + 3) + 3]
    assert shown == examples_block(), "paste this into README.md:\n" + examples_block()


@pytest.mark.parametrize("name", list(KINDS))
def test_every_kind_parses_its_example(name: str) -> None:
    r = Reader()
    config = KINDS[name].parse(r, yaml.safe_load(KINDS[name].example), name)
    assert r.errors == []
    assert config is not None


def test_the_loader_reads_the_readme_examples() -> None:
    text = README.read_text()
    start = text.index("```yaml\n", text.index(MARKER)) + len("```yaml\n")
    config = parse_config(BASE + text[start : text.index("```\n", start)], env={})
    assert [spec.kind for spec in config.middlewares] == list(KINDS)
