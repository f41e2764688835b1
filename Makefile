# Two set-up commands, each self-contained on a fresh machine:
#   make test   creates .venv, installs the project with its dev extra, runs the tests
#   make demo   same set-up, then runs the embedded default (digits) end to end; QUICK=1 for the short version
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
QUICK ?= 0
PYTEST_ARGS ?=

.PHONY: install test demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/python recipes/digits_demo.py $(if $(filter 1,$(QUICK)),--quick,)

clean:
	rm -rf $(VENV) runs/demo
