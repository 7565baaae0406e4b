"""The stall watchdog and the fault settings (issue 21 item 1), in seconds, without a process group."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from launch.runtime.config import load_config
from launch.runtime.configio import ConfigError
from launch.runtime.signals import EXIT_PEER_LOST

BASE = {"stage": "diffusion", "run_dir": "x"}


def _child(body: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    code = textwrap.dedent("""
        import time
        from launch.runtime.watchdog import StallWatchdog
        left = []
        w = StallWatchdog(1.0, rank=3, before_exit=lambda: left.append(print("cleanup ran", flush=True)),
                          poll_s=0.05).start()
    """) + textwrap.dedent(body)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    return r, time.time() - t0


def test_a_stalled_step_counter_exits_with_status_6_and_pauses_are_respected():
    r, took = _child("""
        time.sleep(1.5)                 # not armed before the first step: nothing happens
        with w.paused():
            w.beat(1)
            time.sleep(1.5)             # paused (a save): nothing happens
        w.beat(2)
        print("armed", flush=True)
        time.sleep(30)
        print("not reached", flush=True)
    """)
    assert r.returncode == EXIT_PEER_LOST, r.stdout + r.stderr
    assert "armed" in r.stdout and "cleanup ran" in r.stdout and "not reached" not in r.stdout
    assert "rank 3: no training step completed for 1 s after step 2" in r.stderr, r.stderr
    assert took < 20
    print(f"watchdog: exit {r.returncode} after {took:.1f} s (3 s of pauses, 1 s timeout)")


def test_fault_settings_are_validated_naming_the_key():
    cfg = load_config(None, [], base=BASE)
    assert cfg.runtime.collective_timeout_s == 600 and cfg.runtime.max_restarts == 3
    with pytest.raises(ConfigError, match=r"runtime.collective_timeout_s' = 1.0 is out of range: must be >= 10"):
        load_config(None, ["runtime.collective_timeout_s=1"], base=BASE)
    with pytest.raises(ConfigError, match=r"runtime.max_restarts' = -1 is out of range: must be >= 0"):
        load_config(None, ["runtime.max_restarts=-1"], base=BASE)


def test_a_restart_does_not_undo_a_deliberate_end_of_the_previous_attempt(tmp_path, monkeypatch):
    import json

    from launch.runtime.signals import EXIT_PREEMPTED, EXIT_SAVE_FAILED
    from launch.runtime.watchdog import repeated_failure

    def result(status, run_id="job-1", attempt=0, allocation=""):
        (tmp_path / "result.json").write_text(json.dumps({"status": status, "torchelastic_run_id": run_id,
                                                          "attempt": attempt, "allocation": allocation}))

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    result("save_failed")
    assert repeated_failure(tmp_path) is None                       # the first attempt trains
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert repeated_failure(tmp_path) == ("save_failed", 0, EXIT_SAVE_FAILED)
    result("preempted")
    assert repeated_failure(tmp_path) == ("preempted", 0, EXIT_PREEMPTED)   # the launcher requeues; no restart here
    result("peer_lost")
    assert repeated_failure(tmp_path) is None                       # a lost peer is what restarts are for
    result("preempted", attempt=0)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")           # every later restart repeats it (none trained)
    assert repeated_failure(tmp_path) == ("preempted", 0, EXIT_PREEMPTED)
    result("preempted", attempt=2)
    assert repeated_failure(tmp_path) is None                       # not an earlier attempt's end
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    result("preempted", attempt=0)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")                  # a requeued allocation, same torchrun run id
    assert repeated_failure(tmp_path) is None
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")              # another job (a new start by the user) trains
    assert repeated_failure(tmp_path) is None
