"""A dead or hung rank ends the job (issue 21 item 1), besides the process-group timeout.

A collective whose peer died fails at once under gloo (the connection closes) and after the process-group
timeout (`runtime.collective_timeout_s`) when the peer hangs; NCCL aborts on its timeout with
TORCH_NCCL_ASYNC_ERROR_HANDLING=1. The training loop turns that failure into EXIT_PEER_LOST (train.py).
A rank stuck between collectives (a hung read, a stopped process' peer that never reaches the next
collective) is caught by this watchdog: a daemon thread on every rank that exits the process with
EXIT_PEER_LOST when the step counter has not advanced for the timeout. It is armed by the first completed
step of a start (first steps may compile or warm up the data loader) and paused around saves, validation,
previews and snapshots, whose length depends on the rank. os._exit: no save, no teardown of a process group
whose peer is gone (a barrier there would wait the timeout again).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .dist import is_collective_error  # noqa: F401  (re-exported: the loop's test of a failure)
from .signals import EXIT_PEER_LOST


def collective_failed(rank: int, step: int, e: BaseException, timeout_s: float) -> str:
    return (f"rank {rank}: a collective failed at step {step} ({type(e).__name__}: {str(e).strip()[:400]}): a rank "
            f"died, hung past runtime.collective_timeout_s = {timeout_s:g} s, or left; exiting with status "
            f"{EXIT_PEER_LOST} without saving (a restart resumes from the last complete checkpoint)")


def leave_peer_lost(run_dir: Path, step: int, run_lock) -> None:
    """Rank 0, before os._exit(EXIT_PEER_LOST): RUN_DIR/result.json says peer_lost, and the run lock is freed so
    that a restart starts at once."""
    try:
        (Path(run_dir) / "result.json").write_text(json.dumps({"status": "peer_lost", "step": step,
                                                               "time": time.time()}))
    finally:
        if run_lock is not None:
            run_lock.release()


def attempt_identity() -> dict:
    """Which start of which job wrote a result: torchrun's run id, its restart count, Slurm's requeue count."""
    return {"torchelastic_run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
            "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
            "allocation": os.environ.get("SLURM_RESTART_COUNT", "")}


def repeated_failure(run_dir: Path, log: Callable[[str], None] | None = None) -> tuple[str, int, int] | None:
    """(status, step 0, exit code), said through `log`, when this worker is a torchrun restart after an attempt (the
    same torchrun job, the same allocation, a lower restart count) that ended on purpose with a status a restart
    must not undo: preempted (EXIT_PREEMPTED: the launcher requeues), a checkpoint that could not be written
    (EXIT_SAVE_FAILED) or too many non-finite steps (EXIT_NONFINITE), which a restart would only repeat.
    torchrun restarts on any worker failure; only a lost peer is worth one. Every later restart repeats it too
    (none trains, so none writes a newer result than that attempt's). Same decision on every rank and node (one
    file, the same environment)."""
    from .signals import EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_SAVE_FAILED

    me = attempt_identity()
    if not me["torchelastic_run_id"] or me["attempt"] == 0:
        return None
    try:
        result = json.loads((Path(run_dir) / "result.json").read_text())
    except (OSError, ValueError):
        return None
    codes = {"save_failed": EXIT_SAVE_FAILED, "nonfinite": EXIT_NONFINITE, "preempted": EXIT_PREEMPTED}
    same_job = (result.get("torchelastic_run_id") == me["torchelastic_run_id"]
                and result.get("allocation", "") == me["allocation"] and int(result.get("attempt", -1)) >= 0
                and int(result.get("attempt", -1)) < me["attempt"])
    if same_job and result.get("status") in codes:
        if log is not None:
            log(f"the previous attempt of this torchrun job ended '{result['status']}' (RUN_DIR/result.json); a "
                f"restart must not undo that: exiting with status {codes[result['status']]} at once")
        return result["status"], 0, codes[result["status"]]
    return None


def exit_peer_lost(message: str, before_exit: Callable[[], None] | None = None) -> None:
    print(f"[ldm] error: {message}", file=sys.stderr, flush=True)
    if before_exit is not None:
        try:
            before_exit()
        except Exception as e:  # noqa: BLE001 - leaving is what matters now
            print(f"[ldm] warning: while leaving: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_PEER_LOST)


class StallWatchdog:
    def __init__(self, timeout_s: float, rank: int, before_exit: Callable[[], None] | None = None,
                 poll_s: float = 1.0):
        self.timeout_s, self.rank, self.before_exit, self.poll_s = timeout_s, rank, before_exit, poll_s
        self._last: float | None = None          # None: not armed yet
        self._step = 0
        self._paused = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "StallWatchdog":
        self._thread = threading.Thread(target=self._watch, name="ldm-stall-watchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self, step: int) -> None:
        with self._lock:
            self._step, self._last = step, time.monotonic()

    @contextlib.contextmanager
    def paused(self):
        with self._lock:
            self._paused += 1
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1
                if self._last is not None:
                    self._last = time.monotonic()    # the clock starts again after the pause

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                stalled = (self._last is not None and not self._paused
                           and time.monotonic() - self._last > self.timeout_s)
                step = self._step
            if stalled and not self._stop.is_set():
                exit_peer_lost(f"rank {self.rank}: no training step completed for {self.timeout_s:.0f} s after step "
                               f"{step} (runtime.collective_timeout_s): a rank died or hung; exiting with status "
                               f"{EXIT_PEER_LOST} without saving (restart resumes from the last complete checkpoint)",
                               self.before_exit)
