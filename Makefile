# Two commands for a fresh clone:  `make demo`  and  `make test`.
# Each creates .venv/ at the repository root when missing, installs the project into it, then runs.

PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OUT     ?= demo_out

# DeepSpeed JIT-builds a C++ comm op on first use: keep the build inside the repository (ignored)
# so a second run reuses it.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-slow install bench readme clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ldm demo --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/ldm bench all --json

clean-venv:
	rm -rf $(VENV)
