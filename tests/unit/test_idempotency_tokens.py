"""Signed idempotency tokens: committed vectors, and every way a token can be wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.core.idempotency_tokens import TokenInvalid, mint_token, verify_token

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parents[1] / "vectors" / "idempotency_tokens.json").read_text()
)["vectors"]
SECRET = "k3y-for-tests-only-0123456789abcdef"


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["client_id"])
def test_vectors_mint_and_verify(vector: dict[str, Any]) -> None:
    token = mint_token(
        vector["secret"], vector["client_id"], unix_ms=vector["unix_ms"], salt=vector["salt"]
    )
    assert token == vector["token"]
    now = vector["unix_ms"] / 1000
    assert (
        verify_token(token, vector["secret"], vector["client_id"], window=300, now=now)
        == (vector["unix_ms"])
    )


def _reason(token: str, client: str = "user_42", *, now: float = 1767225600.0) -> str:
    with pytest.raises(TokenInvalid) as info:
        verify_token(token, SECRET, client, window=300, now=now)
    return info.value.reason


def test_forged_truncated_reordered_and_other_clients_tokens() -> None:
    good = VECTORS[0]["token"]
    version, ms, salt, sig = good.split(".")
    flipped = "B" if sig[0] == "A" else "A"
    assert "signature" in _reason(f"{version}.{ms}.{salt}.{flipped}{sig[1:]}")  # forged
    assert "not a v1" in _reason(good[:-5])  # truncated
    assert "not a v1" in _reason(f"{version}.{salt}.{ms}.{sig}")  # reordered
    assert "not a v1" in _reason(f"v2.{ms}.{salt}.{sig}")
    assert "signature" in _reason(f"{version}.{int(ms) + 1}.{salt}.{sig}")  # time edited
    assert "signature" in _reason(good, client="user_43")  # another client's token
    assert "not a v1" in _reason("opaque-key-123")


def test_expired_and_future_tokens() -> None:
    good = VECTORS[0]["token"]
    minted = VECTORS[0]["unix_ms"] / 1000
    assert verify_token(good, SECRET, "user_42", window=300, now=minted + 299)
    for now in (minted + 301, minted - 301):
        with pytest.raises(TokenInvalid) as info:
            verify_token(good, SECRET, "user_42", window=300, now=now)
        assert info.value.expired
        assert "expired" in info.value.reason


def test_fresh_tokens_differ_and_verify() -> None:
    a, b = mint_token(SECRET, "c"), mint_token(SECRET, "c")
    assert a != b  # random salts
    assert verify_token(a, SECRET, "c", window=5)
    with pytest.raises(ValueError, match="salt"):
        mint_token(SECRET, "c", salt="bad.salt")


def test_the_public_api_backends_import_is_gateway_idempotency() -> None:
    """SPEC §5.5 names `gateway.idempotency.mint_token()`: backends import it from there."""
    from gateway import idempotency

    token = idempotency.mint_token("s" * 32, "alice")
    idempotency.verify_token(token, "s" * 32, "alice", window=300.0)
    with pytest.raises(idempotency.TokenInvalid):
        idempotency.verify_token(token, "s" * 32, "bob", window=300.0)
