# Two commands matter: `make run` and `make test`. Both set up everything they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config/gateway.yaml

.PHONY: setup build clean-build run test lint typecheck test-deps bench bench-deps clean certs stack lock

# the editable install is pure Python; `build` compiles the hot path in place (setup.py)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	GATEWAY_COMPILE=0 $(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# the modules setup.py lists, so an edit to any of them recompiles
HOT_SOURCES := $(shell sed -n 's/^ *"\(gateway\/[a-z_/]*\.py\)",$$/\1/p' setup.py)
COMPILED    := build/.compiled

$(COMPILED): $(STAMP) setup.py $(HOT_SOURCES)
	mkdir -p build
	$(BIN)/python setup.py build_ext --inplace --force > build/compile.log 2>&1 || \
		{ tail -40 build/compile.log; exit 1; }
	$(BIN)/python -c "import gateway._compiled as c; c.check_fresh(); assert c.compiled_modules()"
	touch $(COMPILED)

# development certificates for the default config's HTTPS listener (keys never committed)
DEV_CERTS := certs/server.crt

$(DEV_CERTS): | $(STAMP)
	$(BIN)/gateway certs init --out certs --hosts localhost,127.0.0.1

setup: $(STAMP) $(COMPILED) $(DEV_CERTS)

# certs/ for docker-compose.yml, which mounts it read-only into containers whose user (uid
# 10001) is not the files' owner: the server key is made readable to it. A development key
# only; mount real keys owned by that user with mode 0400 (README, Deploying).
certs: $(DEV_CERTS)
	chmod 0644 certs/server.key

build: $(COMPILED)

# back to pure Python (the same behaviour, slower)
clean-build:
	find gateway -name '*.so' -delete
	rm -f $(COMPILED)

run: setup
	$(BIN)/gateway run -c $(CONFIG)

# docker-compose.yml's topology from local processes on 127.0.0.1, in the foreground until
# Ctrl-C (deploy/stack/; STACK_ARGS=--free-ports when the fixed ports are taken)
stack: setup certs test-deps
	$(BIN)/python -m deploy.stack $(STACK_ARGS)

lint: setup
	$(BIN)/ruff check gateway tests bench deploy setup.py

typecheck: setup
	$(BIN)/mypy --strict gateway
	$(BIN)/mypy --strict -p deploy.stack

# Debian packages the tests need (wrk drives the bench harness's own test, with nginx and
# haproxy as its TLS peers and haproxy presenting wrk's client certificate, slowhttptest the
# slow-client attacks of tests/e2e/test_slow_attacks.py, promtool from prometheus checks and
# unit-tests the alert rules in deploy/prometheus/, and its server runs in `make stack` and
# tests/e2e/test_stack.py; docker-compose validates docker-compose.yml; tests/packaging builds
# the image outside Docker with Debian's Python 3.11 (venv, headers) and the build stage's
# compiler, and starts it in a network namespace of its own with iproute2's ip)
IMAGE_TEST_PACKAGES := python3.11-venv python3.11-dev gcc libc6-dev iproute2

test-deps:
	@missing=""; for tool in wrk:wrk slowhttptest:slowhttptest promtool:prometheus \
		redis-server:redis-server redis-cli:redis-tools nginx:nginx-light haproxy:haproxy; do \
		command -v $${tool%%:*} >/dev/null || missing="$$missing $${tool##*:}"; done; \
	for package in $(IMAGE_TEST_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$package 2>/dev/null | grep -q 'ok installed' || \
		missing="$$missing $$package"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	@# without its recommended docker.io: validating the file needs no Docker engine
	@command -v docker-compose >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		docker-compose >/dev/null; }

test: setup test-deps lint typecheck
	$(BIN)/pytest

# the peers compared by bench/ (each is skipped when missing), and valgrind for bench.callgrind
bench-deps:
	@missing=""; for tool in wrk:wrk nginx:nginx-light haproxy:haproxy caddy:caddy valgrind:valgrind; do \
		command -v $${tool%%:*} >/dev/null || missing="$$missing $${tool##*:}"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

bench: setup bench-deps
	$(BIN)/python -m bench $(BENCH_ARGS)

# The image's pinned dependencies, every file checked by its hash (Dockerfile, README "Container
# image"): requirements.lock is what runs in the image, requirements-build.lock what builds it —
# pip, setuptools, mypy and every package mypyc type-checks against (pyproject's
# [build-system] requires), and cyclonedx-bom for the SBOM. The build lock is resolved within
# the runtime lock, so the hot path is compiled against the versions it runs with. Both are
# universal (any platform) for CPython 3.11, the image's Python. Refresh with `make lock`.
LOCK_TOOL := uv==0.13.8
LOCK := $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--no-header --annotation-style line

lock: $(STAMP)
	$(BIN)/pip install --quiet '$(LOCK_TOOL)'
	$(LOCK) pyproject.toml -o requirements.lock
	mkdir -p build
	$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb")) \
		["build-system"]["requires"], "pip>=25.3", "cyclonedx-bom", sep="\n")' > build/build-requires.in
	$(LOCK) build/build-requires.in -c requirements.lock -o requirements-build.lock

clean: clean-build
	rm -rf $(VENV) build *.egg-info
