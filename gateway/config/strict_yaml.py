"""YAML parsing that refuses duplicate keys, each reported at its YAML path and line.

PyYAML keeps the last of two equal keys without a word, so `{rate: 5, rate: 500}` or a second
top-level `routes:` silently drops a value — a typo the config must never ignore (SPEC §2).
`load_yaml` composes the document (with libyaml when PyYAML has it), walks the node tree once to
find every duplicate with its path, then constructs the same plain data `yaml.safe_load` gives.

Why a walk over the composed nodes rather than a check inside `construct_mapping`: nodes do not
know their parents, so only a walk from the root knows a mapping's path; and PyYAML constructs
nested mappings later, after it has already rewritten merge keys in place, when an explicit key
and one it overrides look like two of the same.

Rules:
- Keys are compared as the values YAML makes of them, the way the resulting dict compares them,
  because that is when one value is lost: `1` and `0x1` are one key, so are `true` and `yes`
  (PyYAML reads YAML 1.1 booleans) and even `1` and `true` (in Python `True == 1`).  `"1"` and
  `1` are two keys (a string and an integer) and both survive, so they are not duplicates.
- Merge keys (`<<: *base`, `<<: [*a, *b]`): a key given explicitly overrides a merged one and is
  not a duplicate; among merged mappings the earlier one wins (the YAML merge spec).  Two `<<`
  keys in one mapping are duplicates: write one `<<: [*a, *b]`.
- A mapping reached through an alias is checked once, where its anchor is.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Final

from yaml import MappingNode, Node, ScalarNode, SequenceNode
from yaml.constructor import ConstructorError

from gateway.config.reader import join_path
from gateway.errors import ConfigError

try:
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # PyYAML built without libyaml: the same results, in pure Python
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]

_MERGE: Final = "tag:yaml.org,2002:merge"
_VALUE: Final = "tag:yaml.org,2002:value"
_STR: Final = "tag:yaml.org,2002:str"
#: stands for `<<` among a mapping's keys, so a quoted "<<" string key stays a different key
_MERGE_KEY: Final = object()

KeyOf = Callable[[ScalarNode], Hashable]


class StrictLoader(_SafeLoader):
    """A safe loader that records every duplicate key (see the module docstring)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.duplicates: list[ConfigError] = []

    def construct_document(self, node: Node) -> object:
        self.duplicates = find_duplicates(node, self._key)
        return super().construct_document(node)

    def flatten_mapping(self, node: MappingNode) -> None:
        """Resolve `<<` as the YAML merge spec says: explicit keys win, then earlier mappings.

        PyYAML 6.0.4's own version lets the *last* merged mapping win for keys longer than one
        character (it tells keys apart by string identity; yaml/pyyaml#953), and a mapping
        merged into another brings its merged values rather than its own overrides; so it is
        replaced.  A flattened mapping holds each key once, so nested merges cannot blow up.
        """
        pairs: dict[object, tuple[Node, Node]] = {}
        explicit: list[tuple[Node, Node]] = []
        merges = False
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE:
                explicit.append((key_node, value_node))
                continue
            merges = True
            for source in _merge_sources(node, value_node):
                self.flatten_mapping(source)
                # within one mapping the last of equal keys wins, as in the dict it makes
                own = {self._identity(key): (key, value) for key, value in source.value}
                for identity, pair in own.items():
                    pairs.setdefault(identity, pair)
        if merges:
            for key_node, value_node in explicit:
                pairs[self._identity(key_node)] = (key_node, value_node)
            node.value = list(pairs.values())

    def _key(self, node: ScalarNode) -> Hashable:
        if node.tag == _VALUE:
            # a plain `=` key (YAML 1.1's value key) is the string "=", as PyYAML reads it
            node.tag = _STR
        key: Hashable = self.construct_object(node)
        return key

    def _identity(self, node: Node) -> object:
        # a non-scalar key is refused later by the constructor ("unhashable key")
        return self._key(node) if isinstance(node, ScalarNode) else id(node)


def _merge_sources(node: MappingNode, value: Node) -> Iterator[MappingNode]:
    """The mappings a `<<` value names, in priority order."""
    items = value.value if isinstance(value, SequenceNode) else [value]
    for item in items:
        if not isinstance(item, MappingNode):
            found = "a scalar" if isinstance(item, ScalarNode) else "a sequence"
            raise ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"expected a mapping or a list of mappings to merge, found {found}",
                item.start_mark,
            )
        yield item


def find_duplicates(root: Node, key_of: KeyOf) -> list[ConfigError]:
    """Every duplicate key under `root`, in document order, as `<path>: duplicate key (...)`."""
    found: list[tuple[tuple[int, int], ConfigError]] = []
    seen: set[int] = set()
    # iterative, so a deeply nested document cannot exhaust the Python stack
    stack: list[tuple[Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue  # an alias: its node is checked where its anchor is
        seen.add(id(node))
        children: list[tuple[Node, str]] = []
        if isinstance(node, SequenceNode):
            children = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        elif isinstance(node, MappingNode):
            found.extend(_check_mapping(node, path, key_of, children))
        # depth first in document order, so an anchored node is met at its anchor first
        stack.extend(reversed(children))
    found.sort(key=lambda item: item[0])
    return [error for _, error in found]


def _check_mapping(
    node: MappingNode, path: str, key_of: KeyOf, children: list[tuple[Node, str]]
) -> Iterator[tuple[tuple[int, int], ConfigError]]:
    """The duplicates among one mapping's own keys; its values go to `children` with paths."""
    first: dict[object, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE:
            key: object = _MERGE_KEY
            where = join_path(path, "<<")
            # merged keys land in this mapping: an inline merged mapping has this one's path
            merged = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            children.extend((item, path) for item in merged)
        elif isinstance(key_node, ScalarNode):
            key = key_of(key_node)
            where = join_path(path, key)
            children.append((value_node, where))
        else:
            continue  # refused by the constructor ("unhashable key")
        mark = key_node.start_mark
        line = mark.line + 1
        if key in first:
            message = f"duplicate key (line {line}; first defined on line {first[key]})"
            yield (mark.line, mark.column), ConfigError(where, message)
        else:
            first[key] = line


def load_yaml(text: str) -> tuple[object, list[ConfigError]]:
    """The document's data, as `yaml.safe_load` gives it, and an error per duplicate key.

    Raises `yaml.YAMLError` for text that is not YAML.
    """
    loader = StrictLoader(text)
    try:
        data: object = loader.get_single_data()
        return data, loader.duplicates
    finally:
        loader.dispose()
