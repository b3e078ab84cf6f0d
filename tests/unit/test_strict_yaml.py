"""Strict YAML: the data `yaml.safe_load` gives, libyaml's speed, duplicates found everywhere.

Duplicate keys as `gateway check` reports them are tested in test_config.py; these are the
loader's own promises.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.config.strict_yaml import StrictLoader, load_yaml

REPO = Path(__file__).resolve().parents[2]
SHIPPED = [REPO / "config" / "gateway.yaml", *sorted((REPO / "config" / "examples").glob("*.yaml"))]


def test_libyaml_parses_when_pyyaml_has_it() -> None:
    # the pure-Python parser is about 7 times slower on the shipped configs
    assert yaml.__with_libyaml__
    assert issubclass(StrictLoader, yaml.CSafeLoader)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load_as_safe_load_reads_them(path: Path) -> None:
    text = path.read_text()
    assert load_yaml(text) == (yaml.safe_load(text), [])


@pytest.mark.parametrize(
    ("text", "data", "duplicates"),
    [
        pytest.param("a: &x [*x]\n", None, [], id="a-recursive-alias"),
        pytest.param(
            "a: &x {k: *x, k: 1}\nb: *x\n", None, ["a.k: duplicate key"], id="through-an-alias"
        ),
        pytest.param(
            "a: " + "[" * 900 + "{x: 1, x: 2}" + "]" * 900 + "\n",
            None,
            ["a" + "[0]" * 900 + ".x: duplicate key"],
            id="deeply-nested",
        ),
        pytest.param("{1: a, 1.0: b}\n", {1: "b"}, ["1.0: duplicate key"], id="int-and-float"),
        pytest.param("{null: a, ~: b}\n", {None: "b"}, ["None: duplicate key"], id="nulls"),
        pytest.param("{'<<': a, b: 1}\n", {"<<": "a", "b": 1}, [], id="a-quoted-merge-key"),
        pytest.param(
            "a: &a {k: 1, kk: 1}\nb: &b {k: 2, kk: 2}\nc: {<<: [*a, *b]}\n",
            {"a": {"k": 1, "kk": 1}, "b": {"k": 2, "kk": 2}, "c": {"k": 1, "kk": 1}},
            [],
            id="earlier-merge-wins-whatever-the-key-length",
        ),
        pytest.param(
            "a: &a {<<: {k: 1}, j: 1}\nb: {<<: *a, j: 2}\n",
            {"a": {"k": 1, "j": 1}, "b": {"k": 1, "j": 2}},
            [],
            id="nested-merges",
        ),
        pytest.param(
            "a: &a {<<: {k: 1}, k: 2}\nb: {<<: *a}\n",
            {"a": {"k": 2}, "b": {"k": 2}},
            [],
            id="a-merged-mapping-brings-its-own-overrides",
        ),
        pytest.param("a: {<<: {}, b: 1}\n", {"a": {"b": 1}}, [], id="an-empty-merge"),
        pytest.param("{=: 1, a: {<<: {=: 2}}}\n", {"=": 1, "a": {"=": 2}}, [], id="value-keys"),
    ],
)
def test_loads(text: str, data: object, duplicates: list[str]) -> None:
    loaded, errors = load_yaml(text)
    if data is not None:
        assert loaded == data
    assert [str(e).split(" (")[0] for e in errors] == duplicates


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: {<<: 5}\n", "expected a mapping or a list of mappings to merge, found a scalar"),
        ("a: {<<: [[1]]}\n", "expected a mapping or a list of mappings to merge, found a sequence"),
        ("? [1]\n: 2\n", "found unhashable key"),
        ("a: !!python/name:os.system x\n", "could not determine a constructor"),
    ],
    ids=["merge-a-scalar", "merge-a-list", "unhashable-key", "unsafe-tag"],
)
def test_what_safe_load_refuses_stays_a_yaml_error(text: str, problem: str) -> None:
    with pytest.raises(yaml.YAMLError) as info:
        load_yaml(text)
    assert problem in str(info.value)
