"""Preemption: SIGTERM / SIGUSR1 only set a flag. The loop reads it once per step, all ranks agree
on it through an all-reduce, then every rank saves and exits with EXIT_PREEMPTED. Nothing is
ever saved inside a signal handler (it could interrupt a collective or a half-written file)."""
from __future__ import annotations

import signal
import sys

# Exit statuses of `ldm train` (documented in the README; launch/slurm.sh requeues on EXIT_PREEMPTED).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_LOCKED = 4       # another live run holds RUN_DIR/run.lock (launch/runtime/runlock.py); nothing written
EXIT_SAVE_FAILED = 5  # a checkpoint could not be written (full disk, I/O error): the previous complete one is kept
EXIT_PEER_LOST = 6    # a collective failed or timed out, or no step for runtime.collective_timeout_s: a rank died
                      # or hung; nothing saved from that state (torchrun restarts from the last checkpoint)
EXIT_PREEMPTED = 75   # EX_TEMPFAIL: a checkpoint was saved; start again and it resumes

_WATCHED = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopFlag":
        for sig in _WATCHED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"[ldm] received {signal.Signals(signum).name}: will checkpoint and exit after this step",
                  file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
