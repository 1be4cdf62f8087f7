# Targets used by people and by CI alike. `make test` is the one command CI runs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 \
	&& $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 \
	&& { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: help venv sysdeps lint typecheck test demo bench dashboards clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "essd needs Python >= 3.11 (python3.11 or newer on PATH)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)  ## create .venv and install essd with its test extras (idempotent)

sysdeps:  ## install (as root) or name (otherwise) the Debian packages the tests use
	@scripts/ensure-system-deps.sh

lint: venv  ## ruff lint and format check, and the import layers (import-linter)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: venv  ## mypy --strict on the shipped packages
	$(BIN)/mypy --strict essd drivers hil_sim

test: venv sysdeps lint typecheck  ## everything CI checks: set-up, lint, types, the full test suite
	$(BIN)/pytest $(PYTEST_ARGS)

demo: venv  ## run the daemon against the simulated example site, no hardware needed
	$(BIN)/essd demo $(DEMO_ARGS)

dashboards: venv  ## regenerate observability/grafana/dashboards/*.json from generate.py
	$(BIN)/python observability/grafana/generate.py

bench: venv  ## run the benchmarks and write bench-results.json
	$(BIN)/python -m benchmarks

clean:  ## remove the venv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis bench-results.json
