# The two commands a new user types: `make run` (a local 4-replica cluster running BFS, mounted on
# ./bfs-mnt, with a short demo) and `make test` (lint and the whole test suite). Both create .venv
# and install what they need, Debian's FUSE packages included when run as root.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CLUSTER_DIR ?= .cluster

.PHONY: run test lint sim bench clean docker-test

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (set PYTHON=...)")'
	@# FUSE 3 (the mount, and pyfuse3's build) comes from Debian's packages when missing.
	@if ! pkg-config --exists fuse3 2>/dev/null || ! command -v fusermount3 >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 libfuse3-dev pkg-config; \
		else echo "FUSE 3 is missing: install fuse3, libfuse3-dev and pkg-config (Debian: apt-get install ...)"; exit 1; fi; \
	fi
	@# As root, what the netns tests (iptables) and the dashboard test (headless Chromium) need;
	@# elsewhere those tests skip with the reason (and fail under CI=true).
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		missing=""; command -v iptables >/dev/null || missing="$$missing iptables"; \
		command -v chromium >/dev/null || missing="$$missing chromium fonts-dejavu-core"; \
		if [ -n "$$missing" ]; then apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi; \
	fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
		[ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,fuse,bench]'
	@touch $(STAMP)

MOUNT_DIR ?= bfs-mnt

run: $(STAMP)
	$(BIN)/bft up --dir $(CLUSTER_DIR) --service bfs --mount $(MOUNT_DIR) --demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

sim: $(STAMP)
	$(BIN)/bft sim --seeds 200 --faults all

bench: $(STAMP)
	$(BIN)/python -m bench.micro

# Not part of `make test`: it needs a Docker engine (started here when missing and root) and a
# few minutes. Builds the image on a base made from Debian's packages unless BASE_IMAGE is given.
docker-test:
	deploy/docker-test.sh

clean:
	rm -rf $(VENV) $(CLUSTER_DIR) $(MOUNT_DIR) .pytest_cache .ruff_cache .hypothesis
