# Two commands do everything on a fresh machine:
#   make demo   creates .venv if missing, installs spkprune, runs the digits lottery-ticket recipe
#   make test   creates .venv if missing, installs spkprune with test extras, runs the whole test suite
# make test-fast runs every test not marked slow (the end-to-end runs are left to `make test`, which CI runs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.spkprune-installed

.PHONY: demo test test-fast install bench clean-store

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/spkprune run recipes/digits-quick.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m benchmarks --quick

clean-store:
	rm -rf spkprune-store
