# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean deps

$(STAMP): pyproject.toml setup.py cdc/decoding/_native.pyx cdc/decoding/_copy.pyx cdc/decoding/_reader.pxd cdc/decoding/_buffers.pxd cdc/decoding/_binary.pxd
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

deps: $(STAMP)
	bash scripts/ensure-postgres.sh

demo: deps
	$(PY) -m demo $(if $(filter s3,$(LAKE)),--s3) $(DEMO_ARGS)

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: deps
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: deps
	$(VENV)/bin/ruff check cdc tests demo bench
	$(VENV)/bin/mypy

bench: deps
	$(PY) bench/stream.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) lake .pytest_cache .mypy_cache .ruff_cache
