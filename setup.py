"""Compiles the data plane's hot-path modules with mypyc (pyproject.toml holds the metadata).

The modules below stay ordinary typed Python: mypyc turns them into C extensions that do the same
thing in about 40% fewer instructions per proxied request (bench/README.md).  Set
GATEWAY_COMPILE=0 to install pure Python; `make build` compiles in place for development, and
`gateway/_compiled.py` refuses to import a compiled module whose source changed after it was built.
"""

import os

from setuptools import setup

#: the request path: parsing, routing, forwarding, pooling, metrics updates
HOT_MODULES = [
    "gateway/downstream/connection.py",
    "gateway/downstream/serving.py",
    "gateway/http/messages.py",
    "gateway/http/forwarding.py",
    "gateway/http/path.py",
    "gateway/http/headers.py",
    "gateway/http/flow.py",
    "gateway/http/host.py",
    "gateway/routing.py",
    "gateway/pipeline.py",
    "gateway/identity.py",
    "gateway/stages/proxy.py",
    "gateway/stages/headers.py",
    # a route's upstream Host and path: run on every request of its routes
    "gateway/stages/rewrite.py",
    "gateway/stages/rate_limit.py",
    "gateway/stages/circuit_breaker.py",
    "gateway/stages/retry.py",
    # the jwt stage's request path (a cached token's lookup) and the Authorization reading it
    # calls; verifying a new token stays pyjwt's (gateway/core/jwt_tokens.py, not compiled)
    "gateway/stages/jwt.py",
    "gateway/bearer.py",
    "gateway/core/token_bucket.py",
    "gateway/core/breaker.py",
    "gateway/stores/base.py",
    "gateway/stores/memory.py",
    # a redis store's rate limits: a request spends the lease held here, without Redis
    "gateway/stores/redis_leases.py",
    "gateway/upstream/connection.py",
    "gateway/upstream/pool.py",
    "gateway/upstream/balancer.py",
    "gateway/upstream/upstream.py",
    "gateway/runtime/snapshot.py",
    # the children every request updates; the declarations, whose attributes compiled code reads
    # natively; and /metrics rendering and merging, compiled as before the split
    "gateway/observability/instruments.py",
    # tracing's per-request part: ids, trace headers, the sampling rule, span records
    "gateway/observability/request_trace.py",
    "gateway/observability/spans.py",
    # the export thread's protobuf writer: it shares the CPU with the event loop
    "gateway/observability/otlp_encoding.py",
    "gateway/downstream/tracing.py",
    "gateway/core/trace_context.py",
    "gateway/observability/metrics.py",
    "gateway/observability/exposition.py",
    "gateway/observability/access_log.py",
]

ext_modules = []
if os.environ.get("GATEWAY_COMPILE", "1") != "0":
    from mypyc.build import mypycify

    ext_modules = mypycify(HOT_MODULES, group_name="gateway._hotpath", opt_level="3")

setup(ext_modules=ext_modules)
