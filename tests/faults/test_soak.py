"""Soak (issue 21 item 5): kills at random steps and moments, restarted automatically, end bit-equal.

A 2-rank ZeRO-2 run under launch/local.sh (runtime.max_restarts = the number of kills) meets kill -9 of one
worker, of both workers, kills while a save is paused at a chosen phase (LDM_TEST_SAVE_PAUSE) and one SIGSTOP of
a rank; torchrun restarts it each time from the last complete checkpoint. At the end: exit 0, every step logged
once, the logged losses and the final weights bit-equal to an uninterrupted run, restarts == kills. The figures
(kills, restarts, the largest time from a rank's death to its attempt's end, steps lost per kill) are printed.

ToyStage (tests/runtime/toy.py) stands in for the demo's stage-two model: the mechanics under test (checkpoint,
resume, restarts, the data position, RNG streams) are the runtime's and the same for any stage, and the demo model
would make each of the ~10 restarts cost a minute on a 2-core machine. The short version (2 kills) runs in
`make test`; the full one (10 kills, LDM_SOAK_SEED picks the moments) is marked slow.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import harness as H  # tests/conftest.py puts tests/runtime on the path
from conftest import FAULT_JOB, write_config  # noqa: E402  (tests/faults/conftest.py)

TIMEOUT_S = 10          # runtime.collective_timeout_s: its minimum, so the SIGSTOP costs little
EVERY = 5               # train.checkpoint_every


def _workers(run: Path, dead: set[int], proc: subprocess.Popen, timeout: float = 240) -> dict[int, int]:
    """The pids of the current attempt's workers (pid files rewritten by each attempt)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            pids = {r: int((run / f"pid_rank{r}").read_text()) for r in (0, 1)}
        except (FileNotFoundError, ValueError):
            pids = {}
        if len(pids) == 2 and not set(pids.values()) & dead and all(H.alive(p) for p in pids.values()):
            return pids
        assert proc.poll() is None, f"job ended (rc={proc.returncode}):\n{proc.stdout.read()[-4000:]}"
        time.sleep(0.05)
    raise AssertionError("no live workers of a new attempt")


def _logged_max(run: Path) -> int:
    steps = [r["step"] for r in H.metrics(run) if "loss" in r]
    return max(steps) if steps else 0


def _plan(rng: random.Random, n: int, first: int = 4) -> list[dict]:
    """n events at increasing steps; kinds: one SIGSTOP (when n >= 4), about a third inside saves, the rest kill -9
    of one worker or of both."""
    kinds = ["one"] + ["save"] * max(1, n // 3) + (["stop"] if n >= 4 else [])
    kinds += [rng.choice(["one", "both"]) for _ in range(n - len(kinds))]
    rest = kinds[1:] if n >= 2 else []
    rng.shuffle(rest)
    kinds = (["one"] + rest) if n >= 2 else kinds                # a single-rank kill always among them
    events, step = [], first
    for kind in kinds:
        if kind == "save":
            step = (step // EVERY + 1) * EVERY                  # the next checkpoint step
            phase = rng.choice(["start", "engines", "shards", "complete"])
            events.append({"kind": kind, "step": step, "phase": phase,          # 'complete' is rank 0's alone
                           "rank": 0 if phase == "complete" else rng.choice([0, 1])})
        else:
            events.append({"kind": kind, "step": step, "rank": rng.choice([0, 1])})
        step += rng.randint(3, 6)
    return events


def _soak(tmp_path: Path, repo: Path, events: list[dict], max_steps: int) -> None:
    ref_run, run = tmp_path / "ref", tmp_path / "soak"
    common = {"max_steps": max_steps, "checkpoint_every": EVERY}
    ref_cfg = write_config(tmp_path / "ref.yaml", ref_run, **common)
    cfg = write_config(tmp_path / "soak.yaml", run, **common)
    t_ref = time.time()
    ref = H.run([str(ref_cfg), f"runtime.collective_timeout_s={TIMEOUT_S}"], script=FAULT_JOB, timeout=600)
    H.assert_ok(ref)
    t_ref = time.time() - t_ref

    pauses = ",".join(f"{e['step']}:{e['phase']}:{e['rank']}" for e in events if e["kind"] == "save")
    env = H.job_env(LDM_TRAIN_ENTRY=str(FAULT_JOB), TOY_SLEEP_S="0.05", LDM_MAX_RESTARTS=str(len(events)),
                    LDM_TEST_SAVE_PAUSE=pauses)
    t_soak = time.time()
    proc = subprocess.Popen(["bash", str(repo / "launch" / "local.sh"), "2", str(cfg),
                             f"runtime.collective_timeout_s={TIMEOUT_S}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=repo, start_new_session=True)
    dead: set[int] = set()
    figures = []
    try:
        for e in events:
            pids = _workers(run, dead, proc)
            if e["kind"] == "save":
                marker = run / f"save_paused_{e['step']}_{e['phase']}_rank{e['rank']}"
                deadline = time.time() + 300
                while not marker.exists():
                    assert proc.poll() is None and time.time() < deadline, f"no pause at {marker.name}"
                    time.sleep(0.02)
                victims = [pids[0], pids[1]]
            else:
                H.wait_for_step(run, e["step"], proc, timeout=300)
                victims = [pids[0], pids[1]] if e["kind"] == "both" else [pids[e["rank"]]]
            at = _logged_max(run)
            t0 = time.time()
            if e["kind"] == "stop":
                os.kill(pids[e["rank"]], signal.SIGSTOP)
            else:
                for p in victims:
                    os.kill(p, signal.SIGKILL)
            survivor = [p for p in pids.values() if p not in victims or e["kind"] == "stop"]
            if e["kind"] == "stop":
                survivor = [pids[1 - e["rank"]]]
            while any(H.alive(p) for p in survivor) and time.time() - t0 < TIMEOUT_S + 60:
                time.sleep(0.05)
            took = time.time() - t0
            if e["kind"] == "stop":       # the survivor left on its own; wake the stopped one for torchrun's SIGTERM
                os.kill(pids[e["rank"]], signal.SIGCONT)
            dead |= set(pids.values())
            figures.append({**e, "logged": at, "exit_s": took})
        out = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            H.kill_hard(proc)
    t_soak = time.time() - t_soak
    assert proc.returncode == 0, out[-6000:]
    found = re.findall(r"torchrun restart (\d+) of at most \d+ \(runtime.max_restarts\): at step (\d+)", out)
    restarts = [int(k) for k, _ in found]
    for f, (_, at_step) in zip(figures, found):
        f["resumed"] = int(at_step)          # 0: no checkpoint yet, the restart began from scratch
    print(f"\nsoak: {len(events)} kills, {len(restarts)} restarts, reference {t_ref:.0f} s, soak {t_soak:.0f} s")
    for f in figures:
        where = f"inside the save of step {f['step']} at '{f['phase']}'" if f["kind"] == "save" else f"at step {f['logged']}"
        what = {"one": f"kill -9 of rank {f['rank']}", "both": "kill -9 of both workers", "stop": f"SIGSTOP of rank {f['rank']}",
                "save": f"kill -9 of both workers (rank {f['rank']} paused)"}[f["kind"]]
        print(f"  {what} {where}: attempt over after {f['exit_s']:.1f} s, resumed at step {f.get('resumed')}, "
              f"steps lost {f['logged'] - f.get('resumed', 0)}")
    worst = max(f["exit_s"] for f in figures)
    print(f"  largest time from a rank's death to its attempt's end: {worst:.1f} s "
          f"(SIGSTOP: collective_timeout_s = {TIMEOUT_S} s)")
    assert restarts == list(range(1, len(events) + 1)), f"restarts {restarts} for {len(events)} kills"
    assert worst <= TIMEOUT_S + 30
    losses, want = H.train_losses(run), H.train_losses(ref_run)
    steps = sorted(r["step"] for r in H.metrics(run) if "loss" in r)
    assert steps == list(range(1, max_steps + 1)), f"every step logged once: {steps}"
    assert losses == want, {s: (losses.get(s), want[s]) for s in want if losses.get(s) != want[s]}
    a, b = load_file(str(run / "final_live.safetensors")), load_file(str(ref_run / "final_live.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final weights bit-equal"
    print(f"  bit-equal: {len(want)} logged losses and {len(a)} final tensors")


def test_soak_short(tmp_path, repo):
    """Two kills: one rank at step 4, then both workers inside the save of step 10 (every shard written, no
    COMPLETE yet)."""
    events = [{"kind": "one", "step": 4, "rank": 1},
              {"kind": "save", "step": 10, "phase": "shards", "rank": 0}]
    _soak(tmp_path, repo, events, max_steps=12)


@pytest.mark.slow
def test_soak_ten_kills(tmp_path, repo):
    seed = int(os.environ.get("LDM_SOAK_SEED", "21"))
    events = _plan(random.Random(seed), 10)
    print(f"soak seed {seed}: {events}")
    _soak(tmp_path, repo, events, max_steps=events[-1]["step"] + 6)
