# Two set-up commands, each self-contained on a fresh machine:
#   make test   creates .venv, installs the project with its dev extra (everything + pytest, ruff), lints, runs the tests
#   make demo   creates .venv, installs the project with its demo extra, runs the embedded default (digits) end to end;
#               QUICK=1 for the short version
#   make evidence  the same install, then the paired evidence of issue 13 (about an hour; writes runs/evidence/EVIDENCE.md);
#               QUICK=1 checks its plumbing in a few minutes
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
QUICK ?= 0
PYTEST_ARGS ?=

.PHONY: install install-demo test lint demo evidence clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[demo]"
	touch $@

install: $(VENV)/.installed-dev

install-demo: $(VENV)/.installed-demo

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install-demo
	$(BIN)/python recipes/digits_demo.py $(if $(filter 1,$(QUICK)),--quick,)

evidence: install-demo
	$(BIN)/python recipes/evidence.py $(if $(filter 1,$(QUICK)),--quick,)

clean:
	rm -rf $(VENV) runs/demo runs/evidence runs/evidence_quick
