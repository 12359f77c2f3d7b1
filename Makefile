# make smoke : create .venv, install llmaudit, run every module's audit in toy mode
# make test  : create .venv, install llmaudit with its test extra (and system fonts), run pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := requirements/constraints.txt
PYTEST_ARGS ?=
PYTEST_JOBS ?= auto
SWEEP_JOBS ?= 2

.PHONY: help smoke test test-quick robustness install install-test sysdeps clean

help:
	@echo "make smoke   set up .venv and run 'llmaudit smoke' (every module, toy mode)"
	@echo "make test    set up .venv with the test extra and run the test suite (all of it, in parallel)"
	@echo "make test-quick   the suite without the tests marked slow"
	@echo "make robustness   the seed sweeps (toy 0-19, full 0-4) and the mutant sweep; rewrites docs/robustness.md and the README numbers"
	@echo "make clean   remove .venv and generated reports"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) install -q -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

sysdeps:
	@./scripts/sysdeps.sh

smoke: $(VENV)/.installed
	$(BIN)/llmaudit smoke

test: $(VENV)/.installed-test sysdeps
	$(BIN)/python -m pytest -n $(PYTEST_JOBS) --dist worksteal $(PYTEST_ARGS)

test-quick: $(VENV)/.installed-test sysdeps
	$(BIN)/python -m pytest -n $(PYTEST_JOBS) --dist worksteal -m "not slow" $(PYTEST_ARGS)

# a benchmark, not a test: about an hour on 2 cores
robustness: $(VENV)/.installed
	$(BIN)/llmaudit sweep --toy --seeds 20 -j $(SWEEP_JOBS) --save docs/sweep/toy.json
	$(BIN)/llmaudit sweep --full --seeds 5 -j $(SWEEP_JOBS) --save docs/sweep/full.json
	$(BIN)/python scripts/mutant_sweep.py -j $(SWEEP_JOBS) --save docs/sweep/mutants.json
	$(BIN)/python scripts/publish.py

clean:
	rm -rf $(VENV) build *.egg-info
	find reports -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
