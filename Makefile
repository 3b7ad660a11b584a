# The two commands a new user types: `make run` (a local 4-replica cluster with a demo workload)
# and `make test` (lint and the whole test suite). Both create .venv and install what they need.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CLUSTER_DIR ?= .cluster

.PHONY: run test lint sim bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (set PYTHON=...)")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
		[ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/bft up --dir $(CLUSTER_DIR) --demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

sim: $(STAMP)
	$(BIN)/bft sim --seeds 200 --faults all

bench: $(STAMP)
	$(BIN)/python -m bench.micro

clean:
	rm -rf $(VENV) $(CLUSTER_DIR) .pytest_cache .ruff_cache .hypothesis
