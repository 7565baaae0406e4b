# Two commands for a fresh clone:  `make demo`  and  `make test`.
# Each creates .venv/ at the repository root when missing and installs into it exactly the locked
# environment (requirements/cpu.lock, via pip-sync), then the project itself without dependencies.
# `make lock` re-resolves the lock from pyproject.toml (+ requirements/pins.in).

PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
LOCK    ?= requirements/cpu.lock
STAMP   := $(VENV)/.installed
OUT     ?= demo_out

# DeepSpeed JIT-builds a C++ comm op on first use: keep the build inside the repository (ignored)
# so a second run reuses it.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# pip-tools as the lock pins it (it drives both the install and `make lock`).
PIP_TOOLS := $(shell sed -n 's/^pip-tools==\([^ ]*\).*/\1/p' $(LOCK))
# Same flags for both locks: the header pip-compile writes records them, so `make lock` is reproducible.
LOCK_FLAGS := --quiet --upgrade --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
              --constraint requirements/pins.in

.PHONY: demo test test-slow chromium install install-cuda lock check-lock bench clean-venv

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq "pip-tools==$(PIP_TOOLS)"
	$(BIN)/pip-sync -q $(LOCK)
	$(BIN)/python -m pip install -qq --no-deps --no-build-isolation -e .
	$(BIN)/python -m launch.runtime.lockfile $(LOCK)
	touch $(STAMP)

install: $(STAMP)

# A GPU node (Slurm cluster): the same environment plus xformers, from requirements/cuda.lock.
install-cuda:
	$(MAKE) install LOCK=requirements/cuda.lock STAMP=$(VENV)/.installed-cuda

check-lock:
	$(BIN)/python -m launch.runtime.lockfile $(LOCK)

lock:
	test -x $(BIN)/pip-compile || { test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); $(BIN)/python -m pip install -qq pip-tools; }
	$(BIN)/pip-compile $(LOCK_FLAGS) --extra dev --output-file requirements/cpu.lock pyproject.toml
	$(BIN)/pip-compile $(LOCK_FLAGS) --extra dev --extra cuda --output-file requirements/cuda.lock pyproject.toml

demo: $(STAMP)
	$(BIN)/ldm demo --finetune --out $(OUT)

# tests/report renders the run report in a real headless Chromium: install it when root, else say how.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y chromium; } || \
	  { echo "make: chromium is missing; as root: apt-get install -y chromium" >&2; exit 1; }

test: $(STAMP) chromium
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/ldm bench all --json

clean-venv:
	rm -rf $(VENV)
