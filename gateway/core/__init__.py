"""Pure decision logic with time passed in: token bucket, circuit breaker, health, outliers, and
the token logic the `jwt` and `idempotency` stages use (jwt_tokens.py, idempotency_tokens.py)."""
