"""What the two consumer-authenticating stage kinds (`api_key`, `basic_auth`, SPEC §5.8) share:
the consumer's name and how it is forwarded, the realm of their challenges, their rules about
the rest of a route's pipeline, and how they count their decisions.

A consumer is the name a credential belongs to.  The stage that accepted the credential puts it
in `ctx.consumer` (rate-limit keys and idempotency scopes read it as `consumer`, through
`gateway.identity`) and sends it upstream as `X-Consumer`; a client's own copies of that header
are dropped on every route by forwarding (`gateway.http.headers.CONSUMER_HEADERS`).  Nothing
here ever holds a credential: only names, counts and header names.
"""

from __future__ import annotations

import re
from typing import Final

from gateway.config.stages import PipelineCheck
from gateway.errors import ConfigError
from gateway.stages.converters import CONSUMER_KINDS
from gateway.stages.idempotency import IdempotencyConfig
from gateway.stages.rate_limit import RateLimitConfig

#: the request header the upstream is told the consumer in
CONSUMER_HEADER: Final = "X-Consumer"
CONSUMER_HEADER_BYTES: Final = CONSUMER_HEADER.encode("ascii")

#: a consumer name goes into a header, the rate-limit and idempotency keys and the logs: visible
#: ASCII without ":" (the htpasswd separator) or ",", at most 256 characters
_CONSUMER: Final = re.compile(r"^[!-+\--9;-~]{1,256}$")
#: a realm is sent inside a quoted-string: visible ASCII and spaces, no quote or backslash
_REALM: Final = re.compile(r"^[ !#-\[\]-~]{1,128}$")


def check_consumer(name: object, where: str) -> str:
    """A consumer's name, or ConfigError saying what it may be made of."""
    if not isinstance(name, str) or not _CONSUMER.match(name):
        raise ConfigError(
            where,
            "a consumer name is 1-256 visible ASCII characters without ':' or ','"
            " (it is sent upstream in X-Consumer)",
        )
    return name


def realm(value: object, path: str) -> str:
    if not isinstance(value, str) or not _REALM.match(value):
        raise ConfigError(path, 'must be 1-128 visible ASCII characters or spaces, not " or \\')
    return value


def check_pipeline(check: PipelineCheck, kind: str, hidden_header: str | None) -> None:
    """The rules a consumer stage has about its route's pipeline.

    - One consumer per route: a second api_key or basic_auth stage would replace the first one's
      consumer, and the upstream would be told two.  Either credential (one or the other) is
      not something a pipeline of stages that each require theirs can express.
    - With the credential removed before the request goes on (`hidden_header`, lower case), a
      later rate limit or idempotency scope keyed on that header would read nothing: every
      client would share one bucket, or every keyed request be refused.  `consumer` is the key
      that names who it is.
    """
    earlier = [spec.kind for spec in check.before if spec.kind in CONSUMER_KINDS]
    if earlier:
        check.error(
            f"a route authenticates one consumer: {kind} cannot follow the {earlier[0]} stage"
            " (each would require its own credential and set its own X-Consumer)"
        )
    if hidden_header is None:
        return
    key = f"header:{hidden_header}"
    for path, spec in check.after:
        config = spec.config
        keys: tuple[str, ...] = ()
        if isinstance(config, RateLimitConfig):
            keys = config.key
        elif isinstance(config, IdempotencyConfig):
            keys = (config.scope,)
            if config.token is not None:
                keys += (config.token.client_id,)
        if key in keys:
            check.error(
                f"{key} is removed by the {kind} stage before it (hide_credentials): key on"
                " consumer instead",
                path,
            )
