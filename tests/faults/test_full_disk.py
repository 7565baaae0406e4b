"""Checkpoint writes that survive anything (issue 21 item 2): a full disk during a save, a kill -9 inside one.

A real tmpfs of 64 MiB is the run directory; the save of step 6 is paused by the test hook
(LDM_TEST_SAVE_PAUSE, launch/runtime/checkpoint.py) while the test fills the disk, then let go: the run must
exit with EXIT_SAVE_FAILED naming the path and the MiB free, leave step 3 intact and chosen on resume."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

import harness as H  # tests/conftest.py puts tests/runtime on the path
from conftest import FAULT_JOB, worker_exit_codes, write_config  # noqa: E402  (tests/faults/conftest.py)
from launch.runtime.checkpoint import check_complete
from launch.runtime.signals import EXIT_SAVE_FAILED


@pytest.fixture
def tmpfs(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _wait_for(paths: list[Path], proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        if proc.poll() is not None:
            raise AssertionError(f"job ended (rc={proc.returncode}) before the pause:\n{proc.stdout.read()[-4000:]}")
        assert time.time() < deadline, f"the save never paused at {paths}"
        time.sleep(0.05)


def _fill(path: Path) -> int:
    """Write until the filesystem is full; the bytes written."""
    written = 0
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12):
            while True:
                try:
                    f.write(chunk[:size])
                except OSError:
                    break
                written += size
    return written


def _steps_once(run: Path, last: int) -> None:
    steps = sorted(r["step"] for r in H.metrics(run) if "loss" in r)
    assert steps == list(range(1, last + 1)), f"every step logged once: {steps}"


def test_full_disk_during_save_stops_with_status_5_and_the_previous_checkpoint_resumes(tmp_path, tmpfs):
    run = tmpfs / "run"
    cfg = write_config(tmp_path / "run.yaml", run)
    proc = H.start([str(cfg)], script=FAULT_JOB, LDM_TEST_SAVE_PAUSE="6:start", TOY_SLEEP_S="0.05")
    markers = [run / f"save_paused_6_start_rank{r}" for r in (0, 1)]
    _wait_for(markers, proc)
    ballast = tmpfs / "ballast"
    filled = _fill(ballast)
    t0 = time.time()
    for m in markers:
        m.unlink()
    out = proc.communicate(timeout=180)[0]
    print(f"ballast {filled / 2**20:.1f} MiB; job ended {time.time() - t0:.1f} s after the paused save went on")
    codes = worker_exit_codes(out)
    print(f"worker exit codes {codes} (torchrun: {proc.returncode})")
    # torchrun SIGTERMs the other worker as soon as one exits: a rank that was still tearing down (its result
    # written) may show -15; the status by name is in result.json (what launch/slurm.sh maps to 5)
    assert proc.returncode != 0 and EXIT_SAVE_FAILED in codes.values(), out[-4000:]
    assert set(codes.values()) <= {EXIT_SAVE_FAILED, -15}, out[-4000:]
    line = next(ln for ln in out.splitlines() if "could not be written" in ln)
    print(line)
    assert str(run / "checkpoints") in line and "MiB free on" in line and str(tmpfs) in line, line
    assert "step_00000003 is intact" in line, line
    ck = run / "checkpoints"
    assert not (ck / "step_00000006").exists(), "the partial tag is removed"
    assert (ck / "latest").read_text().strip() == "step_00000003"
    assert check_complete(ck / "step_00000003") is None
    res = H.result(run)
    assert res["status"] == "save_failed" and "MiB free" in res["message"], res
    print(f"result.json: {res}")

    ballast.unlink()
    again = H.run([str(cfg)], script=FAULT_JOB, timeout=240)
    H.assert_ok(again)
    assert "resumed from step_00000003 (step 3)" in again.stderr + again.stdout
    assert H.result(run)["status"] == "completed"
    _steps_once(run, 8)


@pytest.mark.slow          # tests/faults/test_soak.py's short version kills inside a save in `make test`
@pytest.mark.parametrize("phase", ["shards", "complete"])
def test_kill9_inside_a_save_keeps_the_previous_checkpoint_and_resumes_from_it(tmp_path, phase):
    """kill -9 of the whole job while rank 0 is paused inside the save of step 6 (`shards`: every rank's shards
    written, no COMPLETE yet; `complete`: COMPLETE written, `latest` not moved): the next start resumes step 3
    (named by `latest`) and re-saves step 6 over the debris."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", run)
    proc = H.start([str(cfg)], script=FAULT_JOB, LDM_TEST_SAVE_PAUSE=f"6:{phase}:0", TOY_SLEEP_S="0.05")
    _wait_for([run / f"save_paused_6_{phase}_rank0"], proc)
    H.kill_hard(proc)
    ck = run / "checkpoints"
    problem = check_complete(ck / "step_00000006")
    print(f"killed inside the save of step 6 at '{phase}': step 6 {problem or 'complete'}, latest step 3")
    assert (ck / "step_00000006").is_dir() and (problem is not None) == (phase == "shards"), problem
    assert (ck / "latest").read_text().strip() == "step_00000003"
    again = H.run([str(cfg)], script=FAULT_JOB, timeout=240)
    H.assert_ok(again)
    text = again.stderr + again.stdout
    assert "resumed from step_00000003 (step 3)" in text, text[-3000:]
    assert check_complete(ck / "step_00000006") is None and check_complete(ck / "step_00000008") is None
    _steps_once(run, 8)
