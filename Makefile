# make smoke : create .venv, install llmaudit, run every module's audit in toy mode
# make test  : create .venv, install llmaudit with its test extra (and system fonts), run pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := requirements/constraints.txt
PYTEST_ARGS ?=

.PHONY: help smoke test install install-test sysdeps clean

help:
	@echo "make smoke   set up .venv and run 'llmaudit smoke' (every module, toy mode)"
	@echo "make test    set up .venv with the test extra and run the test suite"
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
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
	find reports -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
