# fineweb-pretrain — `make demo` runs the pipeline offline, `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# cpu, cu126, cu128 or cu130: TORCH_VARIANT when given, else what nvidia-smi says (tools/torch_variant.py).
# The stamp names the variant, so a venv built for another one is rebuilt.
export TORCH_VARIANT
DETECTED_TORCH_VARIANT := $(shell TORCH_VARIANT='$(TORCH_VARIANT)' $(PYTHON) tools/torch_variant.py)
STAMP := $(VENV)/.installed-torch-$(DETECTED_TORCH_VARIANT)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: help venv demo test faults bench up down ui browser clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml tools/torch_variant.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# the torch build first: left to the resolver, torch==X comes as PyPI's ~3 GB CUDA build on any machine
	$(PYTHON) tools/torch_variant.py install --python $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed $(VENV)/.installed-torch-*
	@touch $(STAMP)

venv: $(STAMP)  ## create or refresh .venv; torch's CUDA build where nvidia-smi answers, else CPU (TORCH_VARIANT=cpu|cu126|cu128|cu130)
	@echo "torch: the $(DETECTED_TORCH_VARIANT) build in $(VENV)"
	@# the tokenize stage's C engine, compiled ahead when its source changed (else on first use)
	@$(PY) -m gpt.native_bpe >/dev/null || echo "could not build the native tokenizer engine: tokenize.engine=auto will use fastokens (or tiktoken)"

demo: venv  ## run the whole pipeline offline on configs/demo.yaml
	$(PY) -m flows.fineweb_pretrain --config configs/demo.yaml

test: venv browser  ## run the test suite (starts and stops its own Prefect server and worker)
	$(PY) -m pytest tests --ignore=tests/benchmarks --ignore=tests/faults --durations=12

faults: venv  ## the slow fault-injection suite (a killed worker, load on one store); see RELIABILITY.md
	$(PY) -m pytest tests/faults -v

browser:  ## install Debian's chromium for the UI test, where apt-get is available
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	      || echo "could not install chromium: the browser test will be skipped"; \
	  else echo "chromium is not installed and apt-get is unavailable: the browser test will be skipped"; fi; }

up: venv  ## start a local Prefect server, work pool, deployments and worker (honours PREFECT_HOME, PREFECT_SERVER_API_PORT)
	$(PY) -m flows.stack up

down: venv  ## stop the local worker and server
	$(PY) -m flows.stack down

ui: venv  ## print the Prefect UI URL
	@$(PY) -m flows.stack ui

bench: venv  ## run the pytest-benchmark suites, results under .benchmarks/
	$(PY) -m pytest tests/benchmarks --benchmark-only --benchmark-autosave --benchmark-columns=min,mean,max,rounds

clean:  ## remove artifacts and caches (keeps .venv)
	rm -rf artifacts .pytest_cache .benchmarks
