"""A dead or hung rank ends the job fast and cleanly (issue 21 item 1).

2 ranks under torchrun (gloo), runtime.collective_timeout_s = 20: a kill -9 of one worker, or a SIGSTOP of one,
must end the other within the timeout + 30 s with EXIT_PEER_LOST (6) and no checkpoint from that state; under
launch/local.sh with runtime.max_restarts = 1 a killed worker turns into a restart that resumes from the last
complete checkpoint and completes, every step logged once."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import harness as H  # tests/conftest.py puts tests/runtime on the path
from conftest import FAULT_JOB, worker_exit_codes, write_config  # noqa: E402  (tests/faults/conftest.py)
from launch.runtime.checkpoint import check_complete
from launch.runtime.signals import EXIT_PEER_LOST

TIMEOUT_S = 20
RUNTIME = [f"runtime.collective_timeout_s={TIMEOUT_S}"]


def _wait_gone(pid: int, limit: float) -> float:
    t0 = time.time()
    while H.alive(pid) and time.time() - t0 < limit:
        time.sleep(0.05)
    return time.time() - t0


def _pids(run: Path) -> dict[int, int]:
    return {r: int((run / f"pid_rank{r}").read_text()) for r in (0, 1)}


def _no_partial_checkpoint(run: Path) -> None:
    tags = [p for p in (run / "checkpoints").glob("step_*") if p.is_dir()]
    bad = {p.name: check_complete(p) for p in tags if check_complete(p) is not None}
    assert not bad, f"a checkpoint was started after the peer was lost: {bad}"


def _start(tmp_path: Path, **train):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", run, **train)
    proc = H.start([str(cfg), *RUNTIME], script=FAULT_JOB, TOY_SLEEP_S="0.1")
    return run, proc


def test_kill9_of_one_rank_ends_the_other_within_the_timeout(tmp_path):
    run, proc = _start(tmp_path, max_steps=2000, checkpoint_every=4)
    try:
        H.wait_for_step(run, 5, proc)
        pids = _pids(run)
        os.kill(pids[1], signal.SIGKILL)
        t_survivor = _wait_gone(pids[0], TIMEOUT_S + 60)
        out = proc.communicate(timeout=TIMEOUT_S + 60)[0]
    finally:
        if proc.poll() is None:
            H.kill_hard(proc)
    codes = worker_exit_codes(out)
    said = [ln for ln in out.splitlines() if "exiting with status 6" in ln]
    print(f"kill -9 rank 1: rank 0 gone after {t_survivor:.1f} s (limit {TIMEOUT_S + 30} s); worker exit codes "
          f"{codes}; torchrun {proc.returncode}; rank 0 said: {said[:1]}")
    assert t_survivor <= TIMEOUT_S + 30, out[-4000:]
    assert proc.returncode != 0
    assert codes.get(0) in (EXIT_PEER_LOST, None) and said, out[-4000:]
    if codes.get(0) is None:  # torchrun listed only the root cause: rank 0's own words must be there
        assert any(ln.startswith("[ldm] error: rank 0") for ln in out.splitlines()), out[-4000:]
    assert H.result(run)["status"] == "peer_lost"
    _no_partial_checkpoint(run)


@pytest.mark.slow
def test_sigstop_of_one_rank_ends_the_other_within_the_timeout(tmp_path):
    run, proc = _start(tmp_path, max_steps=2000, checkpoint_every=4)
    pids = {}
    try:
        H.wait_for_step(run, 5, proc)
        pids = _pids(run)
        t0 = time.time()
        os.kill(pids[1], signal.SIGSTOP)
        t_survivor = _wait_gone(pids[0], TIMEOUT_S + 60)
        out = proc.communicate(timeout=TIMEOUT_S + 90)[0]     # torchrun: SIGTERM, 30 s, then SIGKILL the stopped one
        t_job = time.time() - t0
    finally:
        for p in pids.values():
            if H.alive(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            H.kill_hard(proc)
    codes = worker_exit_codes(out)
    said = [ln for ln in out.splitlines() if "exiting with status 6" in ln]
    print(f"SIGSTOP rank 1: rank 0 gone after {t_survivor:.1f} s (limit {TIMEOUT_S + 30} s), the job after "
          f"{t_job:.1f} s; worker exit codes {codes}; rank 0 said: {said[:1]}")
    assert TIMEOUT_S - 5 <= t_survivor <= TIMEOUT_S + 30, out[-4000:]
    assert said and codes.get(0) in (EXIT_PEER_LOST, None), out[-4000:]
    assert H.result(run)["status"] == "peer_lost"
    _no_partial_checkpoint(run)


@pytest.mark.slow
def test_local_sh_restarts_a_killed_rank_from_the_last_checkpoint(tmp_path, repo):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", run, max_steps=14, checkpoint_every=4)
    env = H.job_env(LDM_TRAIN_ENTRY=str(FAULT_JOB), TOY_SLEEP_S="0.1")
    env.pop("LDM_MAX_RESTARTS", None)
    proc = subprocess.Popen(["bash", str(repo / "launch" / "local.sh"), "2", str(cfg), *RUNTIME,
                             "runtime.max_restarts=1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=repo, start_new_session=True)
    try:
        H.wait_for_step(run, 6, proc)
        pids = _pids(run)
        t0 = time.time()
        os.kill(pids[1], signal.SIGKILL)
        t_survivor = _wait_gone(pids[0], TIMEOUT_S + 60)
        out = proc.communicate(timeout=300)[0]
        t_done = time.time() - t0
    finally:
        if proc.poll() is None:
            H.kill_hard(proc)
    assert proc.returncode == 0, out[-5000:]
    assert "--max_restarts=1" in out and "torchrun restart 1 of at most 1" in out, out[-5000:]
    resumed = [ln for ln in out.splitlines() if "resumed from step_" in ln]
    print(f"local.sh, kill -9 of rank 1: rank 0 gone after {t_survivor:.1f} s, the restarted job completed "
          f"{t_done:.1f} s after the kill; {resumed}")
    assert resumed and "resumed from step_00000004 (step 4)" in resumed[-1], out[-5000:]
    steps = sorted(r["step"] for r in H.metrics(run) if "loss" in r)
    assert steps == list(range(1, 15)), f"every step logged once: {steps}"
    assert H.result(run)["status"] == "completed"
