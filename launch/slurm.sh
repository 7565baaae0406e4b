#!/usr/bin/env bash
# Train on a Slurm cluster:   sbatch [sbatch options] launch/slurm.sh CONFIG [key=value ...]
#
# Every #SBATCH line below is a default; an option given to sbatch on the command line wins
# (e.g. `sbatch --nodes=4 --time=2-00:00:00 launch/slurm.sh ...`; on CPU-only nodes add
# `--gpus-per-node=0`). The job runs one srun task per node, and that task runs torchrun with one
# training process per GPU (or, on CPU nodes, one per LDM_CPUS_PER_RANK allocated CPUs); the
# nodes meet through torchrun's c10d rendezvous on the first node of the allocation.
#
# Resume, preemption and requeue: the run directory (`run_dir:` of the config) holds the
# checkpoints, and every start of the same CONFIG resumes from the newest complete one, also with
# another number of nodes or GPUs. Slurm sends USR1 to this batch shell <lead> seconds before the
# time limit (--signal=B:USR1@<lead>; `scancel --signal=USR1 --batch JOBID` does the same at any
# time). The shell passes it on to the training processes only (not to torchrun, which USR1 would
# kill), they finish the current step, save a checkpoint and exit with status 75, and when
# RUN_DIR/result.json says "preempted" the shell runs `scontrol requeue`: the job goes back to the
# queue with the same id and resumes when it starts again. SIGTERM (scancel, time limit) also makes
# the training save if it has time (KillWait), but then the job ends without a requeue.
#
# Output: RUN_DIR/logs/slurm-<jobid>.out (appended to by every start of the job); sbatch's own
# --output file only says where that log is, and shows errors that happen before it is known.
#
# Exit status: 0 training completed; 2 usage or configuration error (nothing computed);
# 3 stopped after too many non-finite steps; 5 a checkpoint could not be written (full disk: the
# previous one is intact); 6 a rank died or hung and the restarts (runtime.max_restarts: torchrun's
# within the allocation, then requeues) are used up; 75 preempted after saving a checkpoint (the job was
# requeued; if that failed, e.g. under --no-requeue, submit the same command again to resume);
# anything else: the launch failed (srun's status, or 1).
#
# Environment knobs (export them before sbatch, which passes the environment on):
#   LDM_NPROC_PER_NODE   training processes per node (default: GPUs on the node, else the CPU rule)
#   LDM_CPUS_PER_RANK    CPU nodes: one process per this many allocated CPUs (default 4, at least 1)
#   LDM_RDZV_PORT        rendezvous port on the first node (default 20000 + jobid % 10000)
#   LDM_STOP_RESEND_S    while a stop is pending, pass USR1 on again this often (default 30 s):
#                        a process that is still starting up ignores it
#   LDM_TRAIN_ENTRY      advanced: a custom training entry point, the words after python
#                        (default `-m launch train`); it must take the same command line as
#                        `ldm train` (CONFIG [key=value ...], --print-config, --check-config)
#   LDM_ROOT, LDM_PYTHON and the rest of launch/env.sh
#
# Alternative without torchrun: one srun task per GPU, e.g.
#   srun --ntasks-per-node=8 --gpus-per-task=1 --cpus-per-task=8 .venv/bin/python -m launch train CONFIG
# inside an allocation with --ntasks-per-node=8; launch/runtime/dist.py then takes rank and world size
# from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the first node of the job as the address.
# There srun's signal forwarding reaches the training processes directly.
#
#SBATCH --job-name=ldm-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%j.out

set -euo pipefail

# ---------------------------------------------------------------------------------------------
# Internal modes, run by srun on every node (not for users).

# --node-task PIDDIR CMD...: write this node's pid file, then become CMD (torchrun) with USR1
# ignored, which its workers inherit until the runtime installs its own handler.
if [[ ${1:-} == --node-task ]]; then
  piddir=$2
  shift 2
  node=${SLURMD_NODENAME:-$(hostname -s)}
  echo "slurm.sh: node $node (host $(hostname), SLURM_NODEID=${SLURM_NODEID:-?}) starts torchrun"
  echo "$$" >"$piddir/$node.pid"
  trap '' USR1
  exec "$@"
fi

# --signal-node PIDDIR SIGNAL: send SIGNAL to the training processes of this node, i.e. the
# children of the torchrun agent recorded by --node-task.
if [[ ${1:-} == --signal-node ]]; then
  node=${SLURMD_NODENAME:-$(hostname -s)}
  agent=$(cat "$2/$node.pid" 2>/dev/null || true)
  [[ -n $agent ]] || { echo "slurm.sh: node $node: no torchrun recorded" >&2; exit 0; }
  workers=()
  for stat in /proc/[0-9]*/stat; do
    read -r line <"$stat" 2>/dev/null || continue   # (not $(<...): that exits under set -e when a process is gone)
    rest=${line##*) }          # fields after "(comm) ": state ppid ...
    rest=${rest#* }
    if [[ ${rest%% *} == "$agent" ]]; then
      pid=${stat#/proc/}
      workers+=("${pid%/stat}")
    fi
  done
  echo "slurm.sh: node $node: SIG$3 to training processes ${workers[*]:-(none yet)}"
  if ((${#workers[@]})); then kill -s "$3" "${workers[@]}" 2>/dev/null || true; fi
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# The batch script.

STOP_REQUESTED=0   # USR1 seen: save, exit, requeue
TERMINATING=0      # SIGTERM seen: the job is ending (scancel / time limit): save if possible, no requeue
REQUEUED=0         # scontrol requeue accepted: Slurm ends this start and queues the job again
SRUN_PID=""
LAST_FORWARD=0
# shellcheck disable=SC2317  # on_usr1 and on_term run from the traps below
on_usr1() {
  echo "slurm.sh: $(date '+%F %T') USR1: asking the training to save a checkpoint and stop"
  STOP_REQUESTED=1
  forward_stop
}
# shellcheck disable=SC2317
on_term() {
  if ((REQUEUED)); then return; fi   # the requeue ends this start of the job: expected
  echo "slurm.sh: $(date '+%F %T') SIGTERM: the job is ending; waiting for the training to save and exit"
  TERMINATING=1
}
# Installed first thing: USR1's default action would kill this shell.
trap on_usr1 USR1
trap on_term TERM

die() {
  echo "slurm.sh: $2" >&2
  exit "$1"
}
[[ -n ${SLURM_JOB_ID:-} ]] || die 2 "run me through sbatch: sbatch [options] $0 CONFIG [key=value ...]"
[[ $# -ge 1 && $1 != -* ]] || die 2 "usage: sbatch [sbatch options] launch/slurm.sh CONFIG [key=value ...]"
CONFIG=$1
shift
OVERRIDES=("$@")

# sbatch runs a spooled copy of this file; find the checkout it was submitted from.
find_root() {
  local here cmd
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [[ -f $here/launch/env.sh ]]; then echo "$here"; return; fi
  cmd=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p' | head -n 1)
  if [[ -n $cmd && $cmd != /* ]]; then cmd=${SLURM_SUBMIT_DIR:-.}/$cmd; fi
  if [[ -n $cmd && -f $(dirname "$cmd")/env.sh ]]; then (cd "$(dirname "$cmd")/.." && pwd); return; fi
  if [[ -f ${SLURM_SUBMIT_DIR:-.}/launch/env.sh ]]; then (cd "${SLURM_SUBMIT_DIR:-.}" && pwd); return; fi
  return 1
}
if [[ -z ${LDM_ROOT:-} ]]; then
  LDM_ROOT=$(find_root) || die 2 "cannot find the checkout (launch/env.sh); set LDM_ROOT"
fi
export LDM_ROOT
SELF=$LDM_ROOT/launch/slurm.sh
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$LDM_ROOT/launch/env.sh"

# The run directory, from the resolved config (a config error stops here, status 2).
resolved=$("$LDM_PYTHON" "${LDM_TRAIN_CMD[@]}" "$CONFIG" "${OVERRIDES[@]}" --print-config) || exit $?
RUN_DIR=$(printf '%s\n' "$resolved" | "$LDM_PYTHON" -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["run_dir"])')
mkdir -p "$RUN_DIR/logs"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
LOG=$RUN_DIR/logs/slurm-$SLURM_JOB_ID.out
echo "slurm.sh: job $SLURM_JOB_ID logs to $LOG"
exec >>"$LOG" 2>&1

echo "=== slurm.sh: $(date '+%F %T') job $SLURM_JOB_ID start (SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}"
echo "slurm.sh: config $CONFIG ${OVERRIDES[*]} -> run_dir $RUN_DIR; checkout $LDM_ROOT"
"$LDM_PYTHON" "${LDM_TRAIN_CMD[@]}" "$CONFIG" "${OVERRIDES[@]}" --check-config || exit $?
# A dead or hung rank: torchrun restarts the workers within this allocation up to MAX_RESTARTS times
# (runtime.max_restarts, or LDM_MAX_RESTARTS); when they are used up and the result is peer_lost, the job is
# requeued while SLURM_RESTART_COUNT < MAX_RESTARTS (a new allocation, perhaps without the bad node).
MAX_RESTARTS=$(ldm_max_restarts "$resolved") || exit 2

# Topology: the first node hosts the rendezvous; its address is the node's NodeAddr.
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
NNODES=${SLURM_NNODES:-${#NODES[@]}}
HEAD=${NODES[0]}
HEAD_ADDR=$(scontrol show node "$HEAD" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
HEAD_ADDR=${HEAD_ADDR:-$HEAD}
PORT=${LDM_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}

gpus_on_node() {
  local n=${SLURM_GPUS_ON_NODE:-}
  if [[ -z $n && ${SLURM_GPUS_PER_NODE:-} == 0 ]]; then n=0; fi   # --gpus-per-node=0: a CPU job
  if [[ -z $n && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    local ids
    IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    n=${#ids[@]}
  fi
  if [[ -z $n ]] && command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  echo "${n:-0}"
}
CPUS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}
if [[ -n ${LDM_NPROC_PER_NODE:-} ]]; then
  NPROC=$LDM_NPROC_PER_NODE
elif (($(gpus_on_node) > 0)); then
  NPROC=$(gpus_on_node)
else
  per_rank=${LDM_CPUS_PER_RANK:-4}
  NPROC=$((CPUS / per_rank > 0 ? CPUS / per_rank : 1))
fi
ldm_set_threads "$NPROC" "$CPUS"
echo "slurm.sh: $NNODES node(s) [${NODES[*]}] x $NPROC process(es) = world size $((NNODES * NPROC));" \
  "rendezvous $HEAD_ADDR:$PORT ($HEAD); $CPUS CPUs per node, OMP_NUM_THREADS=$OMP_NUM_THREADS"

# The signal path: one srun task per node records its torchrun's pid in PIDDIR (shared, in the
# run directory); a stop runs a short step on every node that signals that torchrun's children.
PIDDIR=$RUN_DIR/logs/.pids-$SLURM_JOB_ID
mkdir -p "$PIDDIR"
rm -f "$PIDDIR"/*.pid
forward_stop() {
  LAST_FORWARD=$SECONDS
  [[ -n $SRUN_PID ]] || return 0            # not started yet: the stop is handled before launch
  # A tiny step beside the training one (--overlap: Slurm >= 20.11) that asks for no GPU and for
  # the job's memory (--mem=0) rather than a share of its own: it starts although the training
  # step holds all resources. Without it (or when it fails) the fallback below is used.
  if ! timeout 60 srun --overlap --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 \
      --cpus-per-task=1 --gpus-per-node=0 --mem=0 --kill-on-bad-exit=0 \
      bash "$SELF" --signal-node "$PIDDIR" USR1; then
    # No extra step possible: signal the training step itself. Slurm delivers that to every
    # process of the step (proctrack/cgroup, linuxproc), and torchrun ignores USR1.
    echo "slurm.sh: could not start the signal step; signalling the training step instead"
    kill -USR1 "$SRUN_PID" 2>/dev/null || true
  fi
}

result_of() {  # the status in a result.json text ("" when none)
  [[ -n $1 ]] || return 0
  printf '%s' "$1" | "$LDM_PYTHON" -c 'import json, sys; print(json.load(sys.stdin).get("status", ""))' 2>/dev/null || true
}
requeue() {
  rm -rf "$PIDDIR"
  if ((TERMINATING)); then
    echo "slurm.sh: the job is being ended by Slurm: not requeueing; submit again to resume"
    exit 75
  fi
  echo "slurm.sh: $(date '+%F %T') scontrol requeue $SLURM_JOB_ID (it resumes from the checkpoint when it starts again)"
  REQUEUED=1
  if scontrol requeue "$SLURM_JOB_ID"; then
    sleep 30 &   # the requeue ends this shell; nothing else to do here
    wait $! || true
  else
    REQUEUED=0
    echo "slurm.sh: requeue failed (submitted with --no-requeue?): submit the same command again to resume"
  fi
  exit 75
}

if ((STOP_REQUESTED)); then   # USR1 before anything started: nothing to save
  requeue
fi

CMD=("$LDM_PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC"
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD_ADDR:$PORT" --rdzv_id="$SLURM_JOB_ID" --max_restarts="$MAX_RESTARTS"
  "${LDM_TRAIN_CMD[@]}" "$CONFIG" "${OVERRIDES[@]}")
SRUN_OPTS=(--nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --label)
# srun does not always inherit --cpus-per-task from sbatch (Slurm 22.05 did not): pass it on.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then SRUN_OPTS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi

previous=$(cat "$RUN_DIR/result.json" 2>/dev/null || true)
srun "${SRUN_OPTS[@]}" bash "$SELF" --node-task "$PIDDIR" "${CMD[@]}" &
SRUN_PID=$!
# bash runs a trap only between commands: wait in short slices so USR1 is handled at once.
while kill -0 "$SRUN_PID" 2>/dev/null; do
  sleep 1 &
  wait $! || true
  if ((STOP_REQUESTED && SECONDS - LAST_FORWARD >= ${LDM_STOP_RESEND_S:-30})); then
    forward_stop
  fi
done
rc=0
wait "$SRUN_PID" || rc=$?

latest=$(cat "$RUN_DIR/result.json" 2>/dev/null || true)
status=""
if [[ $latest != "$previous" ]]; then status=$(result_of "$latest"); fi
echo "slurm.sh: $(date '+%F %T') training ended: srun status $rc, result ${latest:-(none)}"
case $status in
  completed)
    rm -rf "$PIDDIR"
    exit 0
    ;;
  nonfinite)
    rm -rf "$PIDDIR"
    exit 3
    ;;
  save_failed)
    rm -rf "$PIDDIR"
    echo "slurm.sh: a checkpoint could not be written (see the error above: path and free space); not requeueing"
    exit 5
    ;;
  peer_lost)
    if ((${SLURM_RESTART_COUNT:-0} < MAX_RESTARTS)); then
      echo "slurm.sh: a rank was lost and torchrun's $MAX_RESTARTS restart(s) are used up: requeueing" \
        "(start ${SLURM_RESTART_COUNT:-0} of at most $MAX_RESTARTS requeues)"
      requeue
    fi
    rm -rf "$PIDDIR"
    echo "slurm.sh: a rank was lost; restarts used up (runtime.max_restarts = $MAX_RESTARTS)"
    exit 6
    ;;
  preempted) requeue ;;
esac
rm -rf "$PIDDIR"
echo "slurm.sh: the training failed (no new result.json)"
if ((rc == 0)); then rc=1; fi
exit "$rc"
