"""Launch runtime test jobs (single process or torchrun) and read what they leave behind."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN_TOY = Path(__file__).with_name("run_toy.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), WANDB_MODE="offline")
    env.update({k: str(v) for k, v in extra.items()})
    return env


LDM = "-m launch"   # pass as `script` to run the real `ldm` entry point (python -m launch ...)


def command(script: Path | str, args: list[str], nproc: int) -> list[str]:
    target = ["-m", "launch"] if script == LDM else [str(script)]
    if nproc == 1:
        return [sys.executable, *target, *args]
    return [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", *target, *args]


def run(args: list[str], nproc: int = 2, script: Path | str = RUN_TOY, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(command(script, args, nproc), env=job_env(**env), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def start(args: list[str], nproc: int = 2, script: Path | str = RUN_TOY, **env) -> subprocess.Popen:
    return subprocess.Popen(command(script, args, nproc), env=job_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """All live descendants of pid (Linux /proc), children first seen first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def kill_hard(proc: subprocess.Popen) -> None:
    """kill -9 the whole job, torchrun and its workers, as Slurm kills a job's cgroup: no chance to clean up.
    torchrun starts each worker in its own session, so killing torchrun's process group alone would
    leave the workers running (blocked in a collective, holding memory) after the test."""
    victims = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
        if steps and max(steps) >= step:
            return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"job ended (rc={proc.returncode}) before step {step}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for step {step}")


def result(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "result.json").read_text())


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"rc={proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
