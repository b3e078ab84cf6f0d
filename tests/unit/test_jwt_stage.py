"""The jwt stage with a fake `call_next`: key sets holding unusable keys, token spellings that
must never verify (nor find the cache of the canonical one), and the Authorization forms taken."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.errors import Unauthenticated
from gateway.http.messages import RequestHead, Response
from gateway.pipeline import RequestContext
from gateway.runtime.snapshot import Snapshot
from gateway.stages.jwt import JwtStage, shown_url
from tests.support.context import make_context, make_snapshot
from tests.support.tokens import (
    MISSPELLINGS,
    UNUSABLE_KEYS,
    URL_SAFE_FILLER,
    RsaKey,
    claims,
    jwks,
    jwt_config,
    key_material,
    token,
)

GOOD = RsaKey("good")


async def _ok(ctx: RequestContext) -> Response:
    return Response(200, [])


def _build(tmp_path: Path, document: bytes) -> tuple[JwtStage, Snapshot]:
    path = tmp_path / "jwks.json"
    path.write_bytes(document)
    snapshot = make_snapshot(jwt_config({"jwks_file": path}))
    stage = next(s for _, s in snapshot.stages.values() if isinstance(s, JwtStage))
    return stage, snapshot


async def _call(stage: JwtStage, snapshot: Snapshot, authorization: str | None) -> Response:
    head = RequestHead()
    if authorization is not None:
        head.replace_headers([(b"Authorization", authorization.encode("latin-1"))])
    return await stage(make_context(head, snapshot=snapshot, route="api"), _ok)


@pytest.mark.parametrize(
    ("entry", "reason"),
    [pytest.param(e, r, id=i) for i, e, r in UNUSABLE_KEYS],
)
async def test_an_unusable_key_leaves_the_rest_of_a_jwks_file_working(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, entry: object, reason: str
) -> None:
    with caplog.at_level(logging.WARNING, "gateway.jwt"):
        stage, snapshot = _build(tmp_path, jwks(entry, GOOD))
    response = await _call(stage, snapshot, f"Bearer {token(GOOD, claims())}")
    assert response.status == 200
    [line] = caplog.messages
    assert f"({reason}: " in line
    assert not [m for m in key_material(entry) if m in line]


@pytest.mark.parametrize("misspell", [m[1] for m in MISSPELLINGS], ids=[m[0] for m in MISSPELLINGS])
async def test_a_misspelled_token_is_malformed_even_when_its_canonical_form_is_cached(
    tmp_path: Path, misspell: Callable[[str], str]
) -> None:
    stage, snapshot = _build(tmp_path, jwks(GOOD))
    canonical = token(GOOD, claims(note=URL_SAFE_FILLER))
    assert (await _call(stage, snapshot, f"Bearer {canonical}")).status == 200  # now cached
    with pytest.raises(Unauthenticated) as info:
        await _call(stage, snapshot, f"Bearer {misspell(canonical)}")
    assert info.value.detail == "malformed token"
    assert 'error_description="malformed token"' in dict(info.value.headers)["WWW-Authenticate"]


async def test_a_token_ending_like_a_cached_one_is_verified_and_the_cached_one_kept(
    tmp_path: Path,
) -> None:
    """The cache finds a token by its last characters (its signature's): another payload under
    a cached token's signature ends the same way, and must be verified (and refused), not
    served the cached token's claims — nor push the cached token out."""
    stage, snapshot = _build(tmp_path, jwks(GOOD))
    cached = token(GOOD, claims(sub="alice"))
    assert (await _call(stage, snapshot, f"Bearer {cached}")).status == 200  # now cached
    header, _, signature = cached.split(".")
    other_payload = token(GOOD, claims(sub="mallory")).split(".")[1]
    forged = f"{header}.{other_payload}.{signature}"
    assert forged != cached
    assert forged[-24:] == cached[-24:]
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            await _call(stage, snapshot, f"Bearer {forged}")
        assert (await _call(stage, snapshot, f"Bearer {cached}")).status == 200
    assert [entry[2] for entry in stage._cache.values()] == [cached]


AUTHORIZATION_FORMS = [
    ("canonical", "Bearer {tok}", None),
    ("lower-case-scheme", "bearer {tok}", None),
    ("upper-case-scheme", "BEARER {tok}", None),
    ("two-spaces", "Bearer  {tok}", None),
    ("no-header", None, "a bearer token is required"),
    ("other-scheme", "Basic YTpi", "a bearer token is required"),
    ("scheme-only", "Bearer", "malformed token"),
    ("tab-separator", "Bearer\t{tok}", "malformed token"),
    # whitespace around a field value is not part of it (RFC 9110 §5.5)
    ("trailing-space", "Bearer {tok} \t", None),
    ("not-ascii", "Bearer \xff", "malformed token"),
    ("two-tokens", "Bearer {tok} {tok}", "malformed token"),
]


@pytest.mark.parametrize(
    ("value", "refused"),
    [f[1:] for f in AUTHORIZATION_FORMS],
    ids=[f[0] for f in AUTHORIZATION_FORMS],
)
async def test_authorization_forms(tmp_path: Path, value: str | None, refused: str | None) -> None:
    stage, snapshot = _build(tmp_path, jwks(GOOD))
    authorization = None if value is None else value.format(tok=token(GOOD, claims()))
    if refused is None:
        assert (await _call(stage, snapshot, authorization)).status == 200
        return
    with pytest.raises(Unauthenticated) as info:
        await _call(stage, snapshot, authorization)
    assert info.value.detail == refused


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://idp.example/jwks.json", "https://idp.example/jwks.json"),
        ("https://user:secret@idp.example:8443/jwks", "https://idp.example:8443/jwks"),
        ("https://idp.example/jwks?api_key=secret", "https://idp.example/jwks?…"),
    ],
    ids=["plain", "credentials", "query"],
)
def test_jwks_urls_are_logged_without_credentials(url: str, shown: str) -> None:
    assert shown_url(url) == shown
