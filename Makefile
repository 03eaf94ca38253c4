# Two commands on a fresh machine (see README.md):
#   make quickstart   install into .venv, then train and prune the quickstart recipe on CPU
#   make test         install into .venv, then run the fast test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install quickstart test test-slow clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project's requirements change.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev,sweeps]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/lightning-fisher recipe=quickstart

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
