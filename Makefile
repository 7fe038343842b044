# The Quickstart in two commands: `make train` and `make test`.
#
# Each one first makes sure .venv holds the install: it creates .venv only if it is missing,
# runs exactly `pip install -e ".[dev]"` in it, and leaves a stamp file, .venv/.installed. The next call
# finds the stamp newer than pyproject.toml and goes straight to the command; a changed pyproject.toml
# (newer than the stamp) reinstalls into the same .venv. `rm -rf .venv` starts over.
#
#   make train                         # cnnlab train on the defaults (LeNet-5 on mnist-mini)
#   make train ARGS="--epochs 5 --json"
#   make test                          # pytest: the whole suite
#   make test ARGS="-x -k filter"
#   make lint                          # ruff check . && ruff format --check .
#   make install PYTHON=python3.12     # which Python creates .venv (3.11 or newer)
#
# Without make, the same by hand (docs/install.md):
#   python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]"
#   cnnlab train
#   pytest

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install train test lint

help:
	@echo "make train [ARGS=...]   set up .venv if needed, then cnnlab train (LeNet-5 on mnist-mini)"
	@echo "make test  [ARGS=...]   set up .venv if needed, then pytest (the whole suite)"
	@echo "make lint               ruff check . && ruff format --check ."
	@echo "make install            only set up .venv (pip install -e \".[dev]\"); PYTHON=... picks the Python"

install: $(STAMP)

# The stamp is written only after pip succeeded, so an interrupted install is retried by the next call.
# Where Debian's python3-venv is missing, `python3 -m venv` stops half-way and leaves a .venv without pip;
# after `apt install python3-venv` the next call adds pip to that .venv instead of failing on it.
$(STAMP): pyproject.toml
	@if [ ! -x $(VENV)/bin/python ]; then echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); fi
	@if [ ! -x $(VENV)/bin/pip ]; then $(VENV)/bin/python -m ensurepip --upgrade --default-pip; fi
	@test -x $(VENV)/bin/pip || { echo "$(VENV) has no pip (Debian/Ubuntu: apt install python3-venv)" >&2; exit 1; }
	. $(VENV)/bin/activate && pip install -e ".[dev]"
	@touch $@

train: $(STAMP)
	. $(VENV)/bin/activate && cnnlab train $(ARGS)

test: $(STAMP)
	. $(VENV)/bin/activate && pytest $(ARGS)

lint: $(STAMP)
	. $(VENV)/bin/activate && ruff check . && ruff format --check .
