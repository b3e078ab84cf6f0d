# syntax=docker/dockerfile:1
# The gateway as an edge container: small, non-root, no compiler and no private key inside
# (README "Container image").
#
#   docker build -t gateway .
#   docker run --rm --stop-timeout 45 -p 8080:8080 -p 8443:8443 gateway
#
# tests/packaging/test_image.py runs these steps outside Docker, reading this file: the same
# commands under a temporary root, then the start as uid 10001. It runs every RUN line except the
# base system's own set-up (apt-get, useradd), which it checks instead: keep those in RUN lines of
# their own, and keep what the image adds under /opt, /app and /src.

# both stages start from one image, so the hot path is compiled by and for the interpreter that
# runs it (pin it by digest in a release pipeline: python:3.11-slim-bookworm@sha256:...)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# a C compiler for mypyc's extensions, in this stage only
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The tools that build the image, every file checked against its hash (`make lock`): a pip that
# has --build-constraint, cyclonedx-bom for the SBOM, and what mypyc type-checks against. None of
# them reaches the final stage. pip's cache lives in a BuildKit cache mount, never in a layer.
COPY requirements-build.lock requirements.lock ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes -r requirements-build.lock
# The runtime environment, copied whole into the final stage: no pip or setuptools in it. The
# build venv's pip installs into it (PIP_PYTHON is pip's --python).
RUN python -m venv --without-pip /opt/gateway
ENV PATH=/opt/build/bin:$PATH PIP_PYTHON=/opt/gateway/bin/python
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --require-hashes -r requirements.lock
COPY pyproject.toml setup.py ./
COPY gateway ./gateway
# `pip install .` as anywhere else, without the dependencies the lock installed: mypyc compiles
# the hot path in pip's isolated build environment, whose packages --build-constraint holds to
# the build lock's versions and hashes; GATEWAY_COMPILE=1 turns a missing compiler into an error
# instead of a slower image
RUN --mount=type=cache,target=/root/.cache/pip \
    GATEWAY_COMPILE=1 pip install --no-deps --build-constraint requirements-build.lock . \
 && /opt/gateway/bin/python -I -c "import gateway._compiled as c; \
assert c.compiled_modules(), 'hot path not compiled'"
# the SBOM of every Python package the final stage runs (CycloneDX JSON)
RUN cyclonedx-py environment --output-reproducible --output-format JSON \
        --output-file /src/sbom.json /opt/gateway

FROM ${PYTHON_IMAGE}
# the account the gateway runs as: no password, no login shell, no home of its own
RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin gateway
COPY --from=build /opt/gateway /opt/gateway
COPY --from=build /src/sbom.json /app/sbom.json
COPY config /app/config
COPY docker/entrypoint.sh /opt/gateway/bin/gateway-entrypoint
# where the first start writes development certificates (docker/entrypoint.sh), or real ones are
# mounted: the one directory the gateway's user may write; everything else is root's, read-only
RUN install -d -o 10001 -g 10001 -m 0700 /app/certs
WORKDIR /app
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GATEWAY_CONFIG=/app/config/gateway.yaml \
    GATEWAY_CERTS_DIR=/app/certs \
    GATEWAY_STATUS_BIND=0.0.0.0:9902 \
    GATEWAY_HEALTH_URL=http://127.0.0.1:9902/readyz
# numeric, so Kubernetes' runAsNonRoot can tell it is not root
USER 10001:10001
# 9902: the status listener (default config: GATEWAY_STATUS_BIND), /healthz, /readyz and /metrics
# only, for probes and a Prometheus in another container; the admin API stays on loopback
EXPOSE 8080 8443 9902
# ready (not draining, config loaded), on the status listener; slim has no curl, the venv's
# Python does the request
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen(os.environ['GATEWAY_HEALTH_URL'], timeout=2).status != 200)"]
# SIGTERM drains (shutdown.timeout, 30 s in the default config): give `docker stop` / compose's
# stop_grace_period / Kubernetes' terminationGracePeriodSeconds more than that, e.g. 45 s
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway-entrypoint"]
CMD ["run"]
