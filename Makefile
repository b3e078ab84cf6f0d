# Two commands matter: `make run` and `make test`. Both set up everything they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config/gateway.yaml

.PHONY: setup run test lint typecheck unit clean

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

test: setup lint typecheck
	$(BIN)/pytest

clean:
	rm -rf $(VENV) build *.egg-info
