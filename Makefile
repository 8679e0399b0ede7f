# Quick start: `make serve` (serve the embedded demo models) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SEGLOCK_HOME ?= home
PORT   ?= 8000

.PHONY: install serve demo test test-all bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/seglock serve --home $(SEGLOCK_HOME) --port $(PORT)

demo: $(STAMP)
	$(VENV)/bin/seglock demo

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ''

bench: $(STAMP)
	for script in benchmarks/*.py; do [ "$$script" = benchmarks/reproduce.py ] || $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
