"""Compiles the data plane's hot-path modules with mypyc (pyproject.toml holds the metadata).

The modules below stay ordinary typed Python: mypyc turns them into C extensions that do the same
thing in about 40% fewer instructions per proxied request (bench/README.md).  `make build`
compiles in place for development, and `gateway/_compiled.py` refuses to import a compiled module
whose source changed after it was built.

GATEWAY_COMPILE chooses:
  unset  compile when a C compiler works here; without one, install pure Python and say so
  1      compile, and fail the build when it cannot (CI and the image use this to be sure)
  0      pure Python (the editable install of `make setup`)
The fallback happens only when the compiler itself is missing or broken: a type error or a mypyc
failure on a machine that has one still fails the build, so a bug never ships as "slower".
"""

import os
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import Extension, setup

#: the request path: parsing, routing, forwarding, pooling, metrics updates
HOT_MODULES = [
    "gateway/downstream/connection.py",
    "gateway/downstream/serving.py",
    "gateway/http/messages.py",
    "gateway/http/forwarding.py",
    "gateway/http/path.py",
    "gateway/http/headers.py",
    "gateway/http/flow.py",
    # the two waits of a request (its head, its upstream answer), resumed by the callbacks
    "gateway/core/waiter.py",
    "gateway/http/host.py",
    "gateway/routing.py",
    "gateway/pipeline.py",
    "gateway/identity.py",
    "gateway/stages/proxy.py",
    "gateway/stages/headers.py",
    # a route's upstream Host and path: run on every request of its routes
    "gateway/stages/rewrite.py",
    # the operator stages that look at every request of their routes: an address lookup, the
    # Origin header and the response's CORS headers
    # gateway_stage_total per kind, counted by the operator stages below on every decision
    "gateway/stages/outcomes.py",
    "gateway/stages/cors.py",
    "gateway/stages/ip_filter.py",
    "gateway/stages/rate_limit.py",
    "gateway/stages/circuit_breaker.py",
    "gateway/stages/retry.py",
    # the jwt stage's request path (a cached token's lookup) and the Authorization reading it
    # calls; verifying a new token stays pyjwt's (gateway/core/jwt_tokens.py, not compiled)
    "gateway/stages/jwt.py",
    "gateway/bearer.py",
    # the api_key stage: a header scan, a sha256 and a dict lookup per request of its routes
    # (basic_auth's warm path is as short, but its tests observe its module's functions)
    "gateway/stages/api_key.py",
    # the mtls stage: a certificate check and a header on every request of its routes
    "gateway/stages/mtls.py",
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



def c_compiler_problem() -> str | None:
    """Why a C extension cannot be compiled here, or None when it can.

    Compiles a file that includes Python.h with the compiler setuptools will use (it honours CC,
    CFLAGS and PATH the same way), so a missing compiler and missing Python headers are found
    before mypyc spends minutes type-checking.
    """
    # setuptools provides `distutils` (its own copy) once imported, as build_ext uses it
    from distutils.ccompiler import new_compiler
    from distutils.errors import CCompilerError, DistutilsExecError, DistutilsPlatformError
    from distutils.sysconfig import customize_compiler

    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp, "probe.c")
        probe.write_text("#include <Python.h>\nint gateway_probe(void) { return 0; }\n")
        try:
            compiler = new_compiler()
            customize_compiler(compiler)
            compiler.compile(
                [str(probe)], output_dir=tmp, include_dirs=[sysconfig.get_paths()["include"]]
            )
        except (CCompilerError, DistutilsExecError, DistutilsPlatformError, OSError) as exc:
            return str(exc).strip() or type(exc).__name__
    return None


#: setup.py commands that only describe the package: pip runs two of them (for the build's
#: requirements and its metadata) before the one that builds, each in a new process, and mypyc's
#: full type check and C generation would otherwise run three times
METADATA_COMMANDS = {"egg_info", "dist_info", "sdist"}
BUILD_COMMANDS = {
    "build", "build_ext", "bdist_wheel", "bdist", "install", "develop", "editable_wheel"
}


def hot_path_extensions() -> list[Extension]:
    choice = os.environ.get("GATEWAY_COMPILE", "")
    if choice == "0":
        return []
    arguments = set(sys.argv[1:])
    if arguments & METADATA_COMMANDS and not arguments & BUILD_COMMANDS:
        return []
    problem = c_compiler_problem()
    if problem is not None and choice == "1":
        raise SystemExit(f"gateway: GATEWAY_COMPILE=1 but no working C compiler: {problem}")
    if problem is not None:
        print(
            "\n*** gateway: no working C compiler, so the hot path is NOT compiled ***\n"
            f"    ({problem})\n"
            "    Installing pure Python: the same behaviour, about 40% more CPU per request.\n"
            "    For the compiled build install a C compiler and the Python headers\n"
            "    (Debian: apt-get install gcc python3-dev) and reinstall; set\n"
            "    GATEWAY_COMPILE=1 to make this an error instead.\n",
            file=sys.stderr,
        )
        return []
    from mypyc.build import mypycify

    return mypycify(HOT_MODULES, group_name="gateway._hotpath", opt_level="3")


setup(ext_modules=hot_path_extensions())
