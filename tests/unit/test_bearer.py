"""Bearer credentials from an Authorization value (RFC 9110 §11, RFC 6750 §2.1)."""

from __future__ import annotations

import pytest

from gateway.bearer import bearer_token, names_bearer

CASES = [
    ("canonical", "Bearer abc.DEF-_~+/=", "abc.DEF-_~+/="),
    ("lower-case-scheme", "bearer abc", "abc"),
    ("upper-case-scheme", "BEARER abc", "abc"),
    ("mixed-case-scheme", "bEaReR abc", "abc"),
    ("several-spaces", "Bearer   abc", "abc"),
    ("padding-only-at-the-end", "Bearer ab==", "ab=="),
    ("none", None, None),
    ("empty", "", None),
    ("scheme-only", "Bearer", None),
    ("scheme-and-space", "Bearer ", None),
    ("tab-separator", "Bearer\tabc", None),
    ("leading-space", " Bearer abc", None),
    ("trailing-space", "Bearer abc ", None),
    ("two-tokens", "Bearer abc def", None),
    ("padding-inside", "Bearer a=b", None),
    ("only-padding", "Bearer ==", None),
    ("not-ascii", "Bearer \xff", None),
    ("surrogate-escaped-byte", "Bearer \udcff", None),
    ("newline", "Bearer abc\ndef", None),
    ("comma-param", 'Bearer realm="x"', None),
    ("other-scheme", "Basic YWJj", None),
    ("scheme-prefix", "Bearerabc", None),
    ("longer-scheme", "Bearers abc", None),
    ("kelvin-sign-does-not-fold", "Bearer \u212aey", None),
]


@pytest.mark.parametrize(("value", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bearer_token(value: str | None, expected: str | None) -> None:
    assert bearer_token(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bearer abc", True),
        ("bearer", True),
        ("BEARER \xff", True),
        ("Bearer\tabc", True),
        ("Bearerabc", False),
        ("Basic abc", False),
        ("", False),
    ],
)
def test_names_bearer(value: str, expected: bool) -> None:
    assert names_bearer(value) is expected
