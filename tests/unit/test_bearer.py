"""Bearer credentials from an Authorization value (RFC 9110 §11, RFC 6750 §2.1)."""

from __future__ import annotations

import pytest

from gateway.bearer import bearer_credentials, bearer_token, names_bearer

#: (id, Authorization value, bearer_token, bearer_credentials)
CASES = [
    ("canonical", "Bearer abc.DEF-_~+/=", "abc.DEF-_~+/=", "abc.DEF-_~+/="),
    ("lower-case-scheme", "bearer abc", "abc", "abc"),
    ("upper-case-scheme", "BEARER abc", "abc", "abc"),
    ("mixed-case-scheme", "bEaReR abc", "abc", "abc"),
    ("several-spaces", "Bearer   abc", "abc", "abc"),
    ("padding-at-the-end", "Bearer ab==", "ab==", "ab=="),
    ("none", None, None, None),
    ("empty", "", None, None),
    ("scheme-only", "Bearer", None, None),
    ("scheme-and-space", "Bearer ", None, None),
    ("tab-separator", "Bearer\tabc", None, None),
    ("leading-space", " Bearer abc", None, None),
    ("scheme-prefix", "Bearerabc", None, None),
    ("longer-scheme", "Bearers abc", None, None),
    ("other-scheme", "Basic YWJj", None, None),
    ("look-alike-scheme", "Bear\u0130r abc", None, None),
    ("trailing-space", "Bearer abc ", None, "abc "),
    ("two-tokens", "Bearer abc def", None, "abc def"),
    ("padding-inside", "Bearer a=b", None, "a=b"),
    ("only-padding", "Bearer ==", None, "=="),
    ("not-ascii", "Bearer \xff", None, "\xff"),
    ("surrogate-escaped-byte", "Bearer \udcff", None, "\udcff"),
    ("newline", "Bearer abc\ndef", None, "abc\ndef"),
    ("auth-param", 'Bearer realm="x"', None, 'realm="x"'),
    ("kelvin-sign", "Bearer \u212aey", None, "\u212aey"),
]


@pytest.mark.parametrize(
    ("value", "token", "credentials"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bearer_token_and_credentials(
    value: str | None, token: str | None, credentials: str | None
) -> None:
    assert bearer_token(value) == token
    assert bearer_credentials(value) == credentials


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
