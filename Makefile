# Quick start: `make demo` (the whole pipeline on embedded services), `make test` (the suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-faults services unit docs bench clean

# The compiled core (native/) is built by the install: a change to it installs again.
$(VENV)/.installed: pyproject.toml native/Cargo.toml native/Cargo.lock $(wildcard native/src/*.rs)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# setuptools' note on editable installs of a flat layout (a folder named like the package in the
	@# working directory wins imports: here that folder is the package) is for packagers, not users.
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -e '.[test]'
	@# An editable install leaves cdc's own modules uncompiled, and where PYTHONDONTWRITEBYTECODE is set
	@# every cdc process (the tests start hundreds) would compile them again, about 0.4 s each. A module
	@# edited later is compiled again in memory, as Python does for any stale one.
	$(PY) -m compileall -q cdc
	touch $@

demo: $(VENV)/.installed
	$(PY) -m cdc.dev.demo

# Installs (Debian packages) and starts the servers the suite needs; the tests start the rest.
services:
	bash scripts/test-services

# Where Rust (cargo) is installed, the compiled core (cdc/native.py) must have been built, not skipped
# quietly; without Rust the suite tests the pure-Python path, as a user of such a machine runs it.
REQUIRE_NATIVE := $(shell command -v cargo >/dev/null 2>&1 && echo 1 || echo 0)

test: $(VENV)/.installed services
	CDC_REQUIRE_NATIVE=$(REQUIRE_NATIVE) $(PY) -m pytest -ra --durations=15

# The whole fault suite, long scenarios included (tests/faults); writes the figures docs/reliability.md
# publishes to docs/fault-results/.
test-faults: $(VENV)/.installed services
	CDC_FAULTS_FULL=1 CDC_FAULT_RESULTS=docs/fault-results $(PY) -m pytest -ra --durations=30 tests/faults

unit: $(VENV)/.installed
	CDC_REQUIRE_NATIVE=$(REQUIRE_NATIVE) $(PY) -m pytest -ra tests/unit

# The documentation site from docs/ (mkdocs.yml) into site/; --strict fails on a broken link or anchor.
docs: $(VENV)/.installed
	$(PY) -m mkdocs build --strict

# One session, every contender beside its baseline; writes bench/RESULTS.md. Quick: BENCH_ROWS=50000 make bench
bench: $(VENV)/.installed services
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .demo .pytest_cache site
