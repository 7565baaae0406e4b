"""Helpers shared by the fault tests (issue 21): a small YAML config for tests/faults/fault_job.py."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

FAULT_JOB = Path(__file__).with_name("fault_job.py")


def write_config(path: Path, run_dir: Path, **train) -> Path:
    """A 2-rank ZeRO-2 ToyStage run: tiny, a step in well under a second."""
    tree = {"stage": "diffusion", "run_dir": str(run_dir),
            "train": {"micro_batch_size": 4, "log_every": 1, "max_steps": 8, "checkpoint_every": 3, **train},
            "optimizer": {"lr": 0.01}, "deepspeed": {"zero_stage": 2},
            "runtime": {"collective_timeout_s": 60}}
    path.write_text(yaml.safe_dump(tree))
    return path


def worker_exit_codes(out: str) -> dict[int, int]:
    """rank -> exit code from torchrun's failure report (torchrun itself exits 1 when any worker fails)."""
    return {int(r): int(c) for r, c in re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)",
                                                     out)}
