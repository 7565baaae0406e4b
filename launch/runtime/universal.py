"""Resuming at another world size through DeepSpeed universal checkpoints.

A ZeRO 1-3 checkpoint is cut into per-rank partitions, so it only loads at the world size that
wrote it. DeepSpeed's `ds_to_universal` rewrites it as one folder per parameter (fp32 weights
and optimizer moments), which any world size can load with `checkpoint.load_universal`. Our
saves carry `universal_checkpoint_info` in the client state, which the conversion requires.

Flow on a start whose newest checkpoint was written by a different number of ranks:
rank 0 converts `checkpoints/<tag>/<engine>` into `checkpoints/<tag>_universal/<engine>`
(once; a COMPLETE marker makes it reusable), writes `checkpoints/latest_universal`, all ranks
build their engines with `load_universal` on and load. ZeRO-0 checkpoints hold full states and
load directly at any world size. The EMA is re-partitioned from its saved pieces (launch/runtime/ema.py).

Data position rule across a world-size change: per-rank positions have no meaning for a new
set of ranks, so each rank starts a fresh data stream and RNG keyed by (train.seed, resume
step, rank). In resampled mode every stream draws shards independently at random, so the
sample distribution is unchanged; only the exact order differs from an uninterrupted run.
"""
from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

from . import dist as D
from .checkpoint import COMPLETE, LATEST_UNIVERSAL, _atomic_write


def needs_universal(meta: dict, world_size: int) -> bool:
    return int(meta["world_size"]) != world_size and int(meta["zero_stage"]) > 0


def universal_dir(tag_dir: Path) -> Path:
    return tag_dir.parent / f"{tag_dir.name}_universal"


def convert(tag_dir: Path, engine_names: list[str], env: D.DistEnv, log) -> Path:
    """Rank 0 converts every engine's ZeRO checkpoint once; everyone waits. Returns the folder."""
    from deepspeed.checkpoint import ds_to_universal

    out = universal_dir(tag_dir)
    if env.is_main:
        for name in engine_names:
            if (out / name / COMPLETE).is_file():
                continue
            log(f"converting {tag_dir.name}/{name} to a universal checkpoint")
            args = argparse.Namespace(input_folder=str(tag_dir / name), output_folder=str(out / name),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=False)
            with contextlib.redirect_stdout(io.StringIO()):  # its chatter is not ours to print
                ds_to_universal.main(args)
            (out / name / COMPLETE).write_text("ok")
        _atomic_write(tag_dir.parent / LATEST_UNIVERSAL, out.name)
    D.barrier()
    return out


def load_universal(trainer, tag_dir: Path, meta: dict) -> None:
    """Load every engine of `trainer` from the universal form of `tag_dir` (engines must have
    been built with `checkpoint.load_universal` on; see Trainer.run)."""
    if not needs_universal(meta, trainer.env.world_size):
        for name, engine in trainer.engines.items():
            path, _ = engine.load_checkpoint(str(tag_dir), tag=name, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load engine '{name}' from {tag_dir / name}")
        return
    out = convert(tag_dir, list(trainer.engines), trainer.env, trainer.log)
    for name, engine in trainer.engines.items():
        path, _ = engine.load_checkpoint(str(out), tag=name, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {out / name}")
