# fineweb-pretrain — `make demo` runs the pipeline offline, `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: help venv demo test bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)  ## create or refresh .venv (torch CPU build pinned)

demo: venv  ## run the whole pipeline offline on configs/demo.yaml
	$(PY) -m flows.fineweb_pretrain --config configs/demo.yaml

test: venv  ## run the test suite
	$(PY) -m pytest

bench: venv  ## run the pytest-benchmark suites, results under .benchmarks/
	$(PY) -m pytest tests/benchmarks --benchmark-only --benchmark-autosave --benchmark-columns=min,mean,max,rounds -p no:randomly

clean:  ## remove artifacts and caches (keeps .venv)
	rm -rf artifacts .pytest_cache .benchmarks
