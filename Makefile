# Quick start: `make serve` (serve the embedded demo models) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SEGLOCK_HOME ?= home
PORT   ?= 8000

.PHONY: install serve demo test test-all test-browser screenshots bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	@echo "seglock: the web console will be at http://127.0.0.1:$(PORT)/ui (tokens in $(SEGLOCK_HOME)/initial-tokens.json)"
	$(VENV)/bin/seglock serve --home $(SEGLOCK_HOME) --port $(PORT)

demo: $(STAMP)
	$(VENV)/bin/seglock demo

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ''

# The web console in headless Chromium (apt-get install chromium chromium-driver).
test-browser: $(STAMP)
	$(PY) -m pytest -m browser

# A picture of each console page in docs/img/console-*.png (needs Chromium, as test-browser).
screenshots: $(STAMP)
	$(PY) -m tests.console_screenshots --out docs/img

bench: $(STAMP)
	for script in benchmarks/*.py; do [ "$$script" = benchmarks/reproduce.py ] || $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
