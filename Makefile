# TenantTune: `make demo` and `make test` do all the set-up they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint unit integration e2e faults bench up down clean

setup: $(STAMP)

# The CPU torch wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/tenanttune demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest tests/unit

integration: setup
	$(BIN)/pytest tests/integration

e2e: setup
	$(BIN)/pytest tests/e2e

# The fault tests (real processes, SIGKILL) REPEAT times in a row: per-test pass counts, then
# "N passed, M failed" (runs); fails if any run failed. `make faults REPEAT=10`.
REPEAT ?= 1
faults: setup
	$(BIN)/python tests/e2e/faults/repeat.py $(REPEAT)

# Lint, then every tier (unit, integration, e2e) in one run.
test: lint
	$(BIN)/pytest tests

# Every benchmark (~15 min on 2 cores): one table on stdout, the report in BENCHMARKS.md.
# The bench extra brings the HF Trainer baseline's accelerate and py-spy; npm ci, BullMQ.
bench: setup
	$(BIN)/pip install -q -e '.[dev,bench]'
	cd bench/peers && npm ci --no-audit --no-fund --loglevel=error
	$(BIN)/python bench/run_all.py

up: setup
	$(BIN)/tenanttune up

down: setup
	$(BIN)/tenanttune down

clean:
	rm -rf .tenanttune data models .pytest_cache .mypy_cache .ruff_cache
