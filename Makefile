# Two commands matter: `make run` and `make test`. Both set up everything they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config/gateway.yaml

.PHONY: setup run test lint typecheck test-deps bench bench-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/gateway run -c $(CONFIG)

lint: setup
	$(BIN)/ruff check gateway tests bench

typecheck: setup
	$(BIN)/mypy --strict gateway

# Debian packages the tests need (wrk drives the bench harness's own test)
test-deps:
	@command -v wrk >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }

test: setup test-deps lint typecheck
	$(BIN)/pytest

# the peers compared by bench/ (each is skipped when missing)
bench-deps:
	@missing=""; for tool in wrk:wrk nginx:nginx-light haproxy:haproxy caddy:caddy; do \
		command -v $${tool%%:*} >/dev/null || missing="$$missing $${tool##*:}"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

bench: setup bench-deps
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
