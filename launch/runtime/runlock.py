"""One writer per run directory: workers die with their launcher, and the live run holds a lock.

`die_with_parent()` (every rank, before the process group): Linux `prctl(PR_SET_PDEATHSIG, SIGKILL)`, so a
worker dies when its torchrun agent dies (a `kill -9` of the launcher's process group leaves no orphan training on
in its own session); elsewhere a watchdog thread polls the parent's pid.

`RunLock` (rank 0): `RUN_DIR/run.lock` holds host, pid, start time and a heartbeat refreshed every
`HEARTBEAT_S` by a daemon thread. A second start while the holder is alive raises `RunDirLocked` naming the holder
(exit EXIT_LOCKED); a stale lock (holder's pid gone on this host, or heartbeat older than `STALE_S`) is taken over
with a warning.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = "run.lock"
HEARTBEAT_S = 5.0
STALE_S = 60.0
_PR_SET_PDEATHSIG = 1


class RunDirLocked(RuntimeError):
    pass


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Kill this process when its parent dies (the launcher or torchrun's agent)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
                if os.getppid() != parent:        # the parent died before prctl took effect
                    os.kill(os.getpid(), sig)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(holder: dict) -> str:
    age = time.time() - float(holder.get("heartbeat", 0))
    return (f"host {holder.get('host')} pid {holder.get('pid')} started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(float(holder.get('start', 0))))} UTC, "
            f"heartbeat {age:.0f} s ago")


class RunLock:
    def __init__(self, run_dir: str | Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def is_stale(self, holder: dict) -> bool:
        if holder.get("host") == self.me["host"] and not _pid_alive(int(holder.get("pid", -1))):
            return True
        return time.time() - float(holder.get("heartbeat", 0)) > self.stale_s

    def _write(self) -> None:
        tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**self.me, "heartbeat": time.time()}))
        os.replace(tmp, self.path)

    def acquire(self, log=print) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.write(fd, json.dumps({**self.me, "heartbeat": time.time()}).encode())
                os.close(fd)
                break
            except FileExistsError:
                holder = self.read()
                if holder is None:                 # half-written by another start: give it a moment
                    time.sleep(0.2)
                    holder = self.read()
                if holder is not None and not self.is_stale(holder):
                    raise RunDirLocked(f"run directory {self.path.parent} is in use by another run "
                                       f"({describe(holder)}); stop it first, or wait {self.stale_s:.0f} s "
                                       f"after it died")
                log(f"warning: taking over a stale lock {self.path}"
                    + (f" ({describe(holder)})" if holder else " (unreadable)"))
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
        else:
            raise RunDirLocked(f"could not take the lock {self.path}")
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = self.read()
            if holder is not None and (holder.get("host"), holder.get("pid")) != (self.me["host"], self.me["pid"]):
                return                              # taken over (we were thought dead): do not fight
            try:
                self._write()
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        holder = self.read()
        if holder is not None and (holder.get("host"), holder.get("pid")) == (self.me["host"], self.me["pid"]):
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
