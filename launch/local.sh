#!/usr/bin/env bash
# Train on one machine with torchrun:  launch/local.sh NPROC CONFIG [key=value ...]
#   NPROC   processes (GPUs on a GPU machine; on CPU each process gets cores/NPROC threads, gloo)
# It resumes from the run directory's newest complete checkpoint when there is one (also with
# another NPROC). SIGTERM to torchrun is passed on to the training processes, which save a
# checkpoint before they exit. Environment: launch/env.sh (LDM_PYTHON, LDM_TRAIN_ENTRY, ...).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 NPROC CONFIG [key=value ...]" >&2
  exit 2
fi
NPROC=$1
CONFIG=$2
shift 2
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ldm_set_threads "$NPROC"

# Check the config before starting any process (an error names the key).
"$LDM_PYTHON" "${LDM_TRAIN_CMD[@]}" "$CONFIG" "$@" --check-config

exec "$LDM_PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  "${LDM_TRAIN_CMD[@]}" "$CONFIG" "$@"
