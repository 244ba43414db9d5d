# lstm-stream: every target creates and uses .venv on its own.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
PORT ?= 50051
METRICS_PORT ?= 9464

.DEFAULT_GOAL := help

.PHONY: help venv test tools triton-client test-gpu lint format proto run bench bench-export clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# make run needs the package and what it imports, nothing more (like pip install .);
# test, lint and bench add the dev tools. The dev stamp implies the run stamp.
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP) $(RUN_STAMP)

venv: $(STAMP) ## create .venv with the package and dev tools

TRITON_VENV ?= .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed

# Triton's client pins protobuf < 7 and lstm-stream uses 7: its own venv, driven by the tests.
$(TRITON_STAMP):
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q 'tritonclient[grpc]==2.73.0'
	touch $(TRITON_STAMP)

triton-client: $(TRITON_STAMP) ## .venv-triton with tritonclient[grpc] from PyPI, for the OIP tests

test: $(STAMP) $(TRITON_STAMP) tools ## run the test suite (unit, property and end-to-end)
	$(BIN)/python -m pytest -q

tools: ## system programs the tests run (openssl, prometheus, redis-server, haproxy); apt-get if missing
	@missing=""; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	PATH="$$PATH:/usr/sbin" command -v haproxy >/dev/null 2>&1 || missing="$$missing haproxy"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (test certificates; Prometheus, Redis, HAProxy for deploy/)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing >/dev/null; fi

GPU_VENV ?= .venv-gpu
test-gpu: ## the GPU check (tools/gpu_check.sh): e2e tests on --device cuda, models vs the reference, lstm_bench.gpu -> docs/perf/gpu.json; skips without a GPU
	@if ! nvidia-smi -L >/dev/null 2>&1; then bash tools/gpu_check.sh; exit $$?; fi; \
	set -e; \
	if [ ! -f $(GPU_VENV)/.installed ]; then \
		$(PYTHON) -m venv $(GPU_VENV); \
		$(GPU_VENV)/bin/pip install -q --upgrade pip; \
		$(GPU_VENV)/bin/pip install -q -e '.[dev,gpu]'; \
		: "the base dependencies bring onnxruntime too: the GPU build alone must own the module"; \
		$(GPU_VENV)/bin/pip uninstall -q -y onnxruntime onnxruntime-gpu; \
		$(GPU_VENV)/bin/pip install -q --no-deps 'onnxruntime-gpu==1.31.1'; \
		touch $(GPU_VENV)/.installed; fi; \
	GPU_PYTHON=$(GPU_VENV)/bin/python bash tools/gpu_check.sh

run: $(RUN_STAMP) ## serve the embedded default model (PORT=50051 METRICS_PORT=9464); .venv gets only what running needs
	$(BIN)/lstm-serve --port $(PORT) --metrics-port $(METRICS_PORT) --log-format text

lint: $(STAMP) ## ruff (lint + format check), mypy, and cython-lint on the compiled hot path
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/cython-lint --max-line-length 100 service

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ## the load benchmark vs the echo baseline; JSON, table and plots in docs/perf/
	$(BIN)/lstm-bench --suite --out docs/perf

bench-export: $(STAMP) ## time the two ONNX graph forms per batch size
	$(BIN)/python -m model_export.bench

clean: ## remove the venvs and caches
	rm -rf $(VENV) $(GPU_VENV) $(TRITON_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

proto: $(STAMP) ## regenerate lstm_stream/ stubs from proto/ (committed; a test checks they are fresh)
	cd $(CURDIR) && $(BIN)/python tools/gen_proto.py

EXAMPLE_VENV ?= .venv-example
EXAMPLE_STAMP := $(EXAMPLE_VENV)/.installed

# torch is a large install: only this target's own venv has it, never .venv (make test, make run).
$(EXAMPLE_STAMP):
	$(PYTHON) -m venv $(EXAMPLE_VENV)
	$(EXAMPLE_VENV)/bin/pip install -q torch==2.13.0 safetensors numpy statsmodels==0.15.0
	touch $(EXAMPLE_STAMP)

.PHONY: example example-train
example: $(STAMP) ## the trained forecaster end to end: export, serve, stream, upgrade mid-stream; draws examples/fertility/forecast.png
	$(BIN)/python examples/fertility/serve.py

example-train: $(EXAMPLE_STAMP) ## retrain examples/fertility's two versions (own venv .venv-example with torch, CPU)
	$(EXAMPLE_VENV)/bin/python examples/fertility/train.py

FRAMEWORKS_VENV ?= .venv-frameworks
FRAMEWORKS_STAMP := $(FRAMEWORKS_VENV)/.installed
FIXTURES_OUT ?= build/fixtures

# torch and keras are large installs: only this venv has them, never .venv (make test, make run).
$(FRAMEWORKS_STAMP):
	$(PYTHON) -m venv $(FRAMEWORKS_VENV)
	$(FRAMEWORKS_VENV)/bin/pip install -q torch==2.13.0 'keras>=3.15,<4' safetensors h5py numpy onnx
	touch $(FRAMEWORKS_STAMP)

.PHONY: fixtures
fixtures: $(STAMP) $(FRAMEWORKS_STAMP) ## regenerate the framework fixtures with real PyTorch and Keras into FIXTURES_OUT, then test lstm-export on them
	mkdir -p $(FIXTURES_OUT)
	cd tests/fixtures/frameworks && for gen in gen_torch_fixtures.py gen_keras_fixtures.py; do \
		KERAS_BACKEND=torch $(CURDIR)/$(FRAMEWORKS_VENV)/bin/python $$gen $(abspath $(FIXTURES_OUT)) public || exit 1; done
	cd tests/fixtures/frameworks && for gen in gen_torch_step_onnx.py gen_extra_fixtures.py; do \
		KERAS_BACKEND=torch $(CURDIR)/$(FRAMEWORKS_VENV)/bin/python $$gen $(abspath $(FIXTURES_OUT)) || exit 1; done
	rm -f $(FIXTURES_OUT)/*.weights.h5
	LSTM_FRAMEWORK_FIXTURES=$(abspath $(FIXTURES_OUT)) $(BIN)/python -m pytest -q tests/model_export/test_frameworks.py
	@echo "fixtures in $(FIXTURES_OUT); copy them into tests/fixtures/frameworks to replace the committed ones"
