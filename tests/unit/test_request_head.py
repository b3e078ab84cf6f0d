"""RequestHead.replace_headers: the Authorization value the connection kept while parsing follows
every later change to the header list, and no code of the gateway changes the list another way.

The end-to-end cases (a Connection header naming Authorization, a headers stage before the jwt
stage) are in tests/integration/test_jwt_authorization.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gateway.http.headers import received_name_class
from gateway.http.messages import RequestHead

PACKAGE = Path(__file__).resolve().parents[2] / "gateway"


@pytest.mark.parametrize("name", [b"Authorization", b"authorization", b"AUTHORIZATION"])
def test_the_value_is_the_first_copy_as_received(name: bytes) -> None:
    head = RequestHead()
    head.replace_headers([(b"Author", b"x"), (name, b"Bearer a \t"), (b"Authorization", b"b")])
    assert head.authorization == b"Bearer a \t"  # raw: the jwt stage strips it as get_header does
    assert head.get_header("authorization") == "Bearer a"


def test_a_list_without_authorization_has_none() -> None:
    head = RequestHead()
    head.replace_headers([(b"Authorization", b"Bearer a")])
    head.replace_headers([(b"X-Authorization", b"Bearer a"), (b"Authorizatio", b"b")])
    assert head.authorization is None


def test_the_same_list_edited_in_place_is_read_again() -> None:
    """A headers stage edits the list in place when it drops nothing (it only appends)."""
    head = RequestHead()
    headers = head.headers
    headers.append((b"Authorization", b"Bearer set"))
    head.replace_headers(headers)
    assert head.headers is headers
    assert head.authorization == b"Bearer set"
    headers.clear()
    head.replace_headers(headers)
    assert head.authorization is None


def test_added_headers_are_classed_and_an_added_authorization_is_read_when_none_was() -> None:
    """add_headers (a headers stage that drops nothing) classes only the new names; the
    Authorization value follows when the list had none, and stays the first copy otherwise."""
    head = RequestHead()
    head.replace_headers([(b"Host", b"a"), (b"X_Custom", b"1")])
    head.add_headers([(b"X-Env", b"bench"), (b"authorization", b"Bearer added")])
    assert head.headers[2:] == [(b"X-Env", b"bench"), (b"authorization", b"Bearer added")]
    assert head.header_classes() == [received_name_class(n) for n, _ in head.headers]
    assert head.authorization == b"Bearer added"
    head.add_headers([(b"Authorization", b"Bearer second")])
    assert head.authorization == b"Bearer added"  # the first copy, as get_header reads it
    assert head.get_header("authorization") == "Bearer added"


#: list methods that change a list in place
_MUTATORS = frozenset({"append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse"})
#: (file, function, method): the one place that may change the list otherwise — the connection
#: appends each header as llhttp parses it, beside setting `authorization` for that header
_ALLOWED = {("downstream/connection.py", "on_header", "append")}


def _is_head(node: ast.expr) -> bool:
    """`head`, or `<anything>.head` (ctx.head, exchange.head): a request head."""
    return (isinstance(node, ast.Name) and node.id == "head") or (
        isinstance(node, ast.Attribute) and node.attr == "head"
    )


def _is_head_headers(node: ast.expr) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "headers" and _is_head(node.value)


def _changes(tree: ast.AST) -> list[tuple[str, int, str]]:
    """(function, line, method or "=") of each change to a head's header list not made by
    replace_headers: an assignment to it or to an item of it, or an in-place list method."""
    found: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign | ast.Delete):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Subscript):
                target = target.value
            if _is_head_headers(target):
                found.append((function, node.lineno, "="))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _MUTATORS
            and _is_head_headers(node.func.value)
        ):
            found.append((function, node.lineno, node.func.attr))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "")
    return found


def test_the_guard_sees_each_kind_of_change() -> None:
    source = """
def f(ctx, head):
    head.headers = []
    ctx.head.headers += []
    head.headers[0] = (b"a", b"b")
    del ctx.head.headers[0]
    head.headers.extend([])
    head.replace_headers([])
"""
    assert [how for _, _, how in _changes(ast.parse(source))] == ["=", "=", "=", "=", "extend"]


def test_a_request_heads_header_list_is_replaced_only_through_replace_headers() -> None:
    """RequestHead.authorization is derived from the list: a new way of changing the list that
    does not go through replace_headers would leave it stale (see its docstring)."""
    changes = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        for function, line, how in _changes(ast.parse(path.read_text(), str(path))):
            if (where, function, how) not in _ALLOWED:
                changes.append(f"{where}:{line} {function}: {how}")
    assert changes == []


def test_remove_headers_keeps_the_classes_and_the_authorization_in_step() -> None:
    head = RequestHead()
    head.replace_headers(
        [(b"Accept", b"*/*"), (b"X-Api-Key", b"k"), (b"Authorization", b"Bearer a"), (b"A", b"b")]
    )
    classes = list(head.classes)
    head.remove_headers([1])
    assert head.headers == [(b"Accept", b"*/*"), (b"Authorization", b"Bearer a"), (b"A", b"b")]
    assert head.classes == [classes[0], classes[2], classes[3]]
    assert head.authorization == b"Bearer a"
    head.remove_headers([0, 1])
    assert head.headers == [(b"A", b"b")]
    assert head.classes == [classes[3]]
    # the Authorization header went: the value the jwt stage reads went with it
    assert head.authorization is None
