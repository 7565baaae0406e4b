#!/usr/bin/env bash
# The prepared GPU run (<= 8 minutes in all): install from the CUDA lock, measure (bench/gpu.py), then
# fill the README's GPU block from bench/results/gpu.json (`ldm bench report`).
#
#   bench/gpu.sh                 # on a GPU node: make install-cuda, then measure and report
#   bench/gpu.sh --no-install    # the environment is already there (a node without registry access)
#   bench/gpu.sh --dry-run       # on a CPU: the same code paths, tiny sizes, JSON to bench/results/gpu_dry.json
#
# Other arguments go to `python -m bench.gpu` (e.g. --budget-s 300).
set -euo pipefail
cd "$(dirname "$0")/.."

install=1 dry=0 args=()
for a in "$@"; do
  case "$a" in
    --no-install) install=0 ;;
    --dry-run) dry=1; install=0; args+=("$a") ;;
    *) args+=("$a") ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}

if [ "$install" = 1 ]; then
  make install-cuda
fi
if [ "$dry" = 1 ]; then
  export DS_ACCELERATOR=cpu
fi
# DeepSpeed builds its C++ ops on first use: keep them inside the repository, as the Makefile does.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
timeout --signal=INT 480 "$PY" -m bench.gpu "${args[@]}"      # JSON: bench/results/gpu.json (LDM_BENCH_RESULTS)
if [ "$dry" = 0 ]; then
  "$PY" -m bench.report
fi
