"""One writer per run directory (issue 21 item 4): the run lock and workers that die with their launcher."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launch.runtime.runlock import LOCK_NAME, RunDirLocked, RunLock


def test_second_start_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path, heartbeat_s=0.1).acquire()
    try:
        with pytest.raises(RunDirLocked) as e:
            RunLock(tmp_path).acquire()
        assert f"pid {os.getpid()}" in str(e.value) and "host" in str(e.value)
        t0 = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
        time.sleep(0.4)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > t0     # refreshed
    finally:
        first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock(tmp_path).acquire().release()                                          # free again


def test_stale_lock_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                  "start": time.time() - 100, "heartbeat": time.time()}))
    said = []
    lock = RunLock(tmp_path).acquire(said.append)
    try:
        assert said and "stale" in said[0] and f"pid {int(dead.stdout)}" in said[0]
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    # another host's lock with an old heartbeat is stale too; a fresh one is not
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "start": 0,
                                                  "heartbeat": time.time() - 1000}))
    RunLock(tmp_path, stale_s=60).acquire(said.append).release()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "start": 0,
                                                  "heartbeat": time.time()}))
    with pytest.raises(RunDirLocked, match="host elsewhere pid 1"):
        RunLock(tmp_path, stale_s=60).acquire()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")
def test_worker_in_its_own_session_dies_with_its_launcher(tmp_path):
    """As torchrun's workers: each in its own session, so a kill of the launcher's group misses them."""
    pidfile = tmp_path / "worker.pid"
    worker = textwrap.dedent(f"""
        import os, time
        from launch.runtime.runlock import die_with_parent
        die_with_parent()
        open({str(pidfile)!r}, "w").write(str(os.getpid()))
        time.sleep(120)
    """)
    launcher = textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {worker!r}], start_new_session=True)
        time.sleep(120)
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", launcher], cwd=root, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": root})
    deadline = time.time() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.time() < deadline, "worker never started"
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the worker outlived its launcher by 30 s")


# ----------------------------------------------------------------------------- the real job (torchrun, 2 ranks)

import harness as H  # noqa: E402  (tests/conftest.py puts tests/runtime on the path)

TOY = ["train.micro_batch_size=4", "train.log_every=1", "optimizer.lr=0.01", "deepspeed.zero_stage=2"]


def test_kill9_of_the_launcher_alone_leaves_no_worker(tmp_path):
    run = tmp_path / "run"
    proc = H.start([str(run), *TOY, "train.max_steps=400", "train.checkpoint_every=5"], TOY_SLEEP_S="0.1")
    H.wait_for_step(run, 2, proc)
    pids = [int((run / f"pid_rank{r}").read_text()) for r in (0, 1)]
    os.killpg(proc.pid, signal.SIGKILL)                 # torchrun's group only: the workers have their own sessions
    proc.wait()
    t0 = time.time()
    while any(H.alive(p) for p in pids) and time.time() - t0 < 30:
        time.sleep(0.2)
    left = [p for p in pids if H.alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} outlived their launcher by 30 s"
    print(f"workers gone {time.time() - t0:.1f} s after the launcher's kill")


def test_second_start_on_a_live_run_dir_exits_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    args = [str(run), *TOY, "train.max_steps=2000", "train.checkpoint_every=5"]
    first = H.start(args, TOY_SLEEP_S="0.2")
    H.wait_for_step(run, 2, first)
    holder = int((run / "pid_rank0").read_text())
    t0 = time.time()
    second = H.run(args, timeout=240)
    out = second.stdout + second.stderr
    assert second.returncode != 0, out[-3000:]
    assert "is in use by another run" in out and f"pid {holder}" in out, out[-3000:]
    assert first.poll() is None, "the first run is still training"
    print(f"second start refused in {time.time() - t0:.1f} s")
    os.kill(holder, signal.SIGTERM)                     # end the first run cleanly: it saves and exits 75
    out1 = first.communicate(timeout=120)[0]
    res = H.result(run)
    assert res["status"] == "preempted", out1[-3000:]
    assert sorted(H.train_losses(run)) == list(range(1, res["step"] + 1)), "the first run unharmed, each step once"
    assert (run / "checkpoints" / f"step_{res['step']:08d}" / "COMPLETE").is_file()
    assert not (run / "run.lock").exists()
