#!/usr/bin/env bash
# Environment for training processes, in one place (sourced by local.sh and slurm.sh).
# Everything here can be overridden by exporting the variable before launching.

LDM_ROOT=${LDM_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export LDM_ROOT

# The project's virtual environment when there is one, else whatever python is on PATH.
if [[ -z "${LDM_PYTHON:-}" ]]; then
  if [[ -x "$LDM_ROOT/.venv/bin/python" ]]; then LDM_PYTHON="$LDM_ROOT/.venv/bin/python"; else LDM_PYTHON=python3; fi
fi
export LDM_PYTHON

# DeepSpeed JIT-builds a C++ op on first use: cache it beside the code, not per job.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$LDM_ROOT/.cache/torch_extensions}

# CPU-only nodes: DeepSpeed's CPU accelerator and the gloo backend (chosen in launch/runtime/dist.py).
if [[ -z "${DS_ACCELERATOR:-}" ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=cpu
fi

# The training entry point: the words after "$LDM_PYTHON" (and after torchrun's options).
# Advanced: a custom training entry point that takes the same command line as `ldm train`
# (CONFIG [key=value ...], --print-config, --check-config), e.g. LDM_TRAIN_ENTRY=path/to/train.py.
# LDM_TRAIN_CMD is that entry as an array, for the scripts that source this file.
# shellcheck disable=SC2034
read -r -a LDM_TRAIN_CMD <<<"${LDM_TRAIN_ENTRY:--m launch train}"

# Threads per process: `ldm_set_threads NPROC [CPUS]` sets OMP_NUM_THREADS to CPUS/NPROC (at least 1,
# CPUS defaults to this machine's cores) unless the caller already exported it.
ldm_set_threads() {
  local procs=$1 cpus=${2:-}
  [[ -n $cpus ]] || cpus=$(nproc)
  if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    OMP_NUM_THREADS=$((cpus / procs > 0 ? cpus / procs : 1))
    export OMP_NUM_THREADS
  fi
}

# torchrun's --max_restarts: LDM_MAX_RESTARTS when set, else runtime.max_restarts of the resolved config
# (`ldm_max_restarts RESOLVED_YAML_TEXT`). A rank that dies or hangs ends its peers with status 6
# (runtime.collective_timeout_s); torchrun then restarts every worker, which resume from the last complete checkpoint.
ldm_max_restarts() {
  if [[ -n ${LDM_MAX_RESTARTS:-} ]]; then
    [[ $LDM_MAX_RESTARTS =~ ^[0-9]+$ ]] || { echo "LDM_MAX_RESTARTS=$LDM_MAX_RESTARTS: must be an integer >= 0" >&2; return 2; }
    echo "$LDM_MAX_RESTARTS"
    return 0
  fi
  printf '%s\n' "$1" | "$LDM_PYTHON" -c 'import sys, yaml; print(int((yaml.safe_load(sys.stdin).get("runtime") or {}).get("max_restarts", 0)))'
}

export PYTHONUNBUFFERED=1
export WANDB_MODE=${WANDB_MODE:-offline}
# NCCL: fail loudly instead of hanging when a peer dies.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
