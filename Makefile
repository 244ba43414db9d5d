# lstm-stream: every target creates and uses .venv on its own.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 50051
METRICS_PORT ?= 9464

.DEFAULT_GOAL := help

.PHONY: help venv test lint format proto run bench-export clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## create .venv with the package and dev tools

test: $(STAMP) ## run the test suite (unit, property and end-to-end)
	$(BIN)/python -m pytest -q

lint: $(STAMP) ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench-export: $(STAMP) ## time the two ONNX graph forms per batch size
	$(BIN)/python -m model_export.bench

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

proto: $(STAMP) ## regenerate lstm_stream/ stubs from proto/ (committed; a test checks they are fresh)
	cd $(CURDIR) && $(BIN)/python tools/gen_proto.py
