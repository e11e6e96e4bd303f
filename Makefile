# `make test` and `make serve` set up .venv themselves on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-all test-cuda lint serve setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the prepared CPU build (a bare `torch` requirement would pull CUDA packages)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check tandem tests scripts bench
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q -x --durations=15

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not cuda' --durations=15

test-cuda: $(STAMP)
	$(BIN)/python -m pytest -q -m cuda --durations=15

serve: $(STAMP)
	$(BIN)/tandem serve --model-path models/default --pp-size 2 --host 127.0.0.1 --port 30000

clean:
	rm -rf $(VENV) *.egg-info
