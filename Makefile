# lmlab's dev loop. `make help` lists the targets. Every target sets up .venv first (again when pyproject.toml or
# constraints.txt changed), installing the exact versions in constraints.txt, so a fresh clone installs what CI ran.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install first; the default is CPU here, CUDA from PyPI on a GPU machine.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# One pytest worker per core, a module's tests on one worker (its module fixtures are built once); conftest.py gives
# each worker one torch thread.
JOBS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(JOBS) --dist loadscope

.PHONY: help setup train lint format test test-fast hooks lock clean
.DEFAULT_GOAL := help

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv with the pinned dependencies (constraints.txt) and lmlab in editable mode

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt "$(TORCH)"
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $@

train: setup  ## run the embedded default (train.py on the bundled sample; ARGS="model=t5 stage=sft" to change it)
	$(BIN)/python train.py $(ARGS)

lint: setup  ## ruff lint and format check (what CI runs first)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup  ## fix what ruff can fix and format the code
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint  ## lint, then the whole test suite (what CI runs; JOBS=2 workers)
	$(PYTEST) tests

test-fast: setup  ## the inner loop: tests not marked slow (under ~2 minutes)
	$(PYTEST) -m "not slow" tests

hooks: setup  ## install the git pre-commit hook (ruff on every commit; .pre-commit-config.yaml)
	$(BIN)/pre-commit install

lock: setup  ## re-pin constraints.txt to what .venv holds now (after changing pyproject.toml on purpose)
	{ echo "# Exact versions make setup installs (pip -c). Regenerate on purpose: make lock."; \
	  $(PIP) freeze --exclude-editable | grep -v -i -E '^(pip|setuptools|wheel)==' | sed -E 's/\+[A-Za-z0-9.]+$$//'; \
	} > constraints.txt

clean:  ## remove run outputs and caches
	rm -rf outputs multirun .cache
