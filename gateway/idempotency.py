"""The public API for backends that hand signed idempotency tokens to their clients (SPEC §5.5):
`gateway.idempotency.mint_token(secret, client_id)` mints one, `verify_token` checks one.

Only this name is promised to users; the logic lives in `gateway/core/idempotency_tokens.py`
(the `idempotency` stage is `gateway/stages/idempotency.py`).
"""

from gateway.core.idempotency_tokens import TokenInvalid, mint_token, verify_token

__all__ = ["TokenInvalid", "mint_token", "verify_token"]
