"""The package's imports run one way (docs/architecture.md, "Layers"): no cycle between modules
or between packages, and each package imports only from its own layer or the ones below.

Read from the source with `ast`, so a new upward import fails here before anyone draws the
graph by hand.  Imports under `if TYPE_CHECKING:` name types for annotations and never run;
they are left out, as the architecture page says.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Set
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "gateway"

#: lowest first; a package may import from its own layer and any layer before it
LAYERS: tuple[frozenset[str], ...] = tuple(
    frozenset(names.split())
    for names in (
        "errors bearer certificates dev_certificates _compiled",
        "config",
        "core observability",
        "stores tls",
        "http",
        "pipeline routing",
        "identity upstream",
        "stages",
        "downstream",
        "runtime",
        "app cli admin status probes web_listener supervisor watch inotify idempotency"
        " __main__ __init__",
    )
)


def _modules(root: Path) -> dict[str, Path]:
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _runtime_imports(body: Iterable[ast.stmt]) -> Iterable[str]:
    """Modules named by imports that run, at any depth (functions import lazily too)."""
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _runtime_imports(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
            yield node.module
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                yield from _runtime_imports([child])
            elif isinstance(child, ast.ExceptHandler):
                yield from _runtime_imports(child.body)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports when it runs."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = set(_runtime_imports(ast.parse(path.read_text()).body))
        # `from gateway.http import headers` names the module gateway.http.headers, and
        # `from gateway.http.headers import x` the module gateway.http.headers (x is no module)
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def package_of(module: str) -> str:
    """gateway.http.flow -> http; gateway.tls -> tls; gateway -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def package_graph(graph: Mapping[str, Set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = defaultdict(set)
    for module, imported in graph.items():
        for other in imported:
            if package_of(other) != package_of(module):
                packages[package_of(module)].add(package_of(other))
    return dict(packages)


def cycles(graph: Mapping[str, Set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward_imports(packages: Mapping[str, Set[str]]) -> list[str]:
    rank = {name: level for level, names in enumerate(LAYERS) for name in names}
    return sorted(
        f"{importer} -> {imported}"
        for importer, imported_set in packages.items()
        for imported in imported_set
        if rank[imported] > rank[importer]
    )


GRAPH = import_graph()


def test_every_package_has_a_layer() -> None:
    placed = set().union(*LAYERS)
    assert {package_of(m) for m in GRAPH} <= placed


def test_no_cycle_between_modules() -> None:
    assert cycles(GRAPH) == []


def test_no_cycle_between_packages() -> None:
    assert cycles(package_graph(GRAPH)) == []


def test_no_package_imports_a_layer_above_it() -> None:
    assert upward_imports(package_graph(GRAPH)) == []


@pytest.mark.parametrize(
    ("importer", "forbidden"),
    [
        ("config", "stages"),
        ("config", "tls"),
        ("core", "upstream"),
        ("http", "pipeline"),
        ("pipeline", "stages"),
        ("downstream", "stages"),
        ("downstream", "upstream"),
    ],
    ids=lambda value: str(value),
)
def test_named_boundaries(importer: str, forbidden: str) -> None:
    """The boundaries the architecture page names, spelled out (a regrouping of LAYERS that
    moved one of these packages would otherwise pass silently)."""
    assert forbidden not in package_graph(GRAPH).get(importer, set())


# -- the checks above can fail ------------------------------------------------------------------


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    root = tmp_path / "gateway"
    (root / "config").mkdir(parents=True)
    (root / "stages").mkdir()
    (root / "__init__.py").write_text("")
    (root / "config" / "__init__.py").write_text("")
    (root / "stages" / "__init__.py").write_text("")
    (root / "config" / "load.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from gateway.stages.kind import Ignored\n"
        "def load():\n"
        "    from gateway.stages import kind\n"
    )
    (root / "stages" / "kind.py").write_text("from gateway.config.load import load\n")
    graph = import_graph(root)
    assert graph["gateway.config.load"] == {"gateway.stages", "gateway.stages.kind"}
    assert cycles(graph) == [["gateway.config.load", "gateway.stages.kind"]]
    packages = package_graph(graph)
    assert cycles(packages) == [["config", "stages"]]
    assert upward_imports(packages) == ["config -> stages"]


def test_span_export_loads_only_when_spans_are_recorded() -> None:
    """A gateway with tracing off (or only propagating) starts no export thread and never
    imports the export module, http.client's exporter or grpcio (about 10 MiB resident): only a
    recording Tracer imports gateway.observability.span_export, and only `protocol: grpc`
    imports grpc."""
    probe = (
        "import sys, gateway.app, gateway.observability.tracing, gateway.stages.proxy\n"
        "print(sorted(m for m in sys.modules if m == 'gateway.observability.span_export'"
        " or m.split('.')[0] in ('grpc', 'opentelemetry')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"


def test_redis_loads_only_when_a_redis_store_is_built() -> None:
    """redis-py imports OpenTelemetry's SDK when it is installed (~0.2 s, ~10 MiB): a gateway
    without a redis store never imports it; building one does."""
    probe = (
        "import sys, gateway.app, gateway.stores.redis\n"
        "print(any(m.split('.')[0] == 'redis' for m in sys.modules))\n"
        "gateway.stores.redis.RedisStore('s', 'redis://127.0.0.1:1/0')\n"
        "print(any(m.split('.')[0] == 'redis' for m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.split() == ["False", "True"]
