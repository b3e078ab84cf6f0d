"""Every stage kind, by its YAML key: the one list to extend when a stage kind is added.

Each entry is the `KIND` record at the end of the kind's module (`gateway/stages/<kind>.py`,
see gateway/stages/kind.py).  The config loader is given this mapping by its callers (app.py,
tests/support/config.py) rather than importing it: the config layer knows no stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from gateway.stages import (
    api_key,
    basic_auth,
    circuit_breaker,
    compress,
    cors,
    headers,
    idempotency,
    ip_filter,
    jwt,
    mirror,
    mtls,
    rate_limit,
    redirect,
    retry,
    rewrite,
)
from gateway.stages.kind import StageKind

KINDS: Final[Mapping[str, StageKind[Any, Any]]] = {
    kind.name: kind
    for kind in (
        mtls.KIND,
        jwt.KIND,
        rate_limit.KIND,
        circuit_breaker.KIND,
        idempotency.KIND,
        retry.KIND,
        headers.KIND,
        rewrite.KIND,
        redirect.KIND,
        cors.KIND,
        ip_filter.KIND,
        api_key.KIND,
        basic_auth.KIND,
        compress.KIND,
        mirror.KIND,
    )
}
