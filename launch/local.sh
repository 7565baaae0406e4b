#!/usr/bin/env bash
# Train on one machine with torchrun:  launch/local.sh NPROC CONFIG [key=value ...]
#   NPROC   processes (GPUs on a GPU machine; on CPU each process gets cores/NPROC threads, gloo)
# It resumes from the run directory's newest complete checkpoint when there is one (also with
# another NPROC). SIGTERM to torchrun is passed on to the training processes, which save a
# checkpoint before they exit. A rank that dies or hangs ends the others (status 6 after at most
# runtime.collective_timeout_s) and torchrun restarts all of them from the last complete checkpoint, up to
# runtime.max_restarts times (LDM_MAX_RESTARTS overrides it; 0: no restart). Environment: launch/env.sh
# (LDM_PYTHON, LDM_TRAIN_ENTRY, LDM_MAX_RESTARTS, ...).
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
if [[ -n ${LDM_MAX_RESTARTS:-} ]]; then
  MAX_RESTARTS=$(ldm_max_restarts "")
else
  MAX_RESTARTS=$(ldm_max_restarts "$("$LDM_PYTHON" "${LDM_TRAIN_CMD[@]}" "$CONFIG" "$@" --print-config)")
fi
echo "local.sh: torchrun --nproc_per_node=$NPROC --max_restarts=$MAX_RESTARTS" >&2

exec "$LDM_PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" --max_restarts="$MAX_RESTARTS" \
  "${LDM_TRAIN_CMD[@]}" "$CONFIG" "$@"
