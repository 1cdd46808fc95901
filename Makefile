# Quick start: `make demo` (the whole pipeline on embedded services), `make test` (the suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-faults services unit bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m cdc.dev.demo

# Installs (Debian packages) and starts the servers the suite needs; the tests start the rest.
services:
	bash scripts/test-services

test: $(VENV)/.installed services
	$(PY) -m pytest -ra --durations=15

# The whole fault suite, long scenarios included (tests/faults); writes the figures docs/reliability.md
# publishes to docs/fault-results/.
test-faults: $(VENV)/.installed services
	CDC_FAULTS_FULL=1 CDC_FAULT_RESULTS=docs/fault-results $(PY) -m pytest -ra --durations=30 tests/faults

unit: $(VENV)/.installed
	$(PY) -m pytest -ra tests/unit

bench: $(VENV)/.installed
	$(PY) bench/throughput.py
	$(PY) bench/snapshot.py
	$(PY) bench/sink.py

clean:
	rm -rf $(VENV) .demo .pytest_cache
