# make train: set up .venv (if missing or pyproject changed) and run the embedded default.
# make test:  set up .venv and run the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
# The torch build to install first; the default is CPU here, CUDA from PyPI on a GPU machine.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup train test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

train: setup
	$(BIN)/python train.py $(ARGS)

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf outputs multirun .cache
