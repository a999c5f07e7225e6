# fineweb-pretrain — `make demo` runs the pipeline offline, `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# keep in step with pyproject.toml
TORCH_VERSION := 2.13.0
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: help venv demo test bench up down ui browser clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# torch's CPU build first: left to the resolver, torch==2.13.0 may come as the ~2.8 GB CUDA build
	$(PY) -m pip install --quiet 'torch==$(TORCH_VERSION)+cpu' \
	  || $(PY) -m pip install --quiet 'torch==$(TORCH_VERSION)+cpu' --extra-index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)  ## create or refresh .venv (torch CPU build pinned)

demo: venv  ## run the whole pipeline offline on configs/demo.yaml
	$(PY) -m flows.fineweb_pretrain --config configs/demo.yaml

test: venv browser  ## run the test suite (starts and stops its own Prefect server and worker)
	$(PY) -m pytest tests --ignore=tests/benchmarks

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
