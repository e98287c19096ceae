# Two entry points for a fresh machine: `make quickstart` (tiny HARPE run on CPU) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install quickstart test bench

$(BIN)/.installed: setup.py requirements-cpu.txt constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-cpu.txt
	$(BIN)/pip install -q -e ".[dev]" -c constraints-cpu.txt
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/rope_overhead.py
