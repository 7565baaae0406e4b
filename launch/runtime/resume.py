"""What a checkpoint restores into a trainer, and the per-rank state it is made of.

A checkpoint of the same world size gives every rank back its own RNG streams, data position, log window
and counters, so the resumed run continues bit for bit; one of another world size loads through
DeepSpeed's universal format (launch/runtime/universal.py) and re-seeds each rank from (seed, step, rank).
"""
from __future__ import annotations

import json
import random
from typing import Any, Mapping

import numpy as np
import torch

from .checkpoint import restore_rng
from .configio import config_hash, flatten, to_plain
from .universal import load_universal


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class LogWindow:
    """Sums of logged scalars since the last log step (saved in checkpoints, so a resumed run
    logs the same means as an uninterrupted one)."""

    def __init__(self, state: dict | None = None):
        self.sums: dict[str, float] = dict((state or {}).get("sums", {}))
        self.counts: dict[str, int] = dict((state or {}).get("counts", {}))
        self.images = int((state or {}).get("images", 0))

    def add(self, values: Mapping[str, Any]) -> None:
        for k, v in values.items():
            v = float(v.detach().float().mean()) if torch.is_tensor(v) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}

    def state(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts), "images": self.images}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()
        self.images = 0


def resume(trainer, loaded_tag: str) -> int:
    """Restore a trainer (engines and EMA built, no step taken) from checkpoint `loaded_tag`: engine and
    optimizer states (through a universal checkpoint when it was written at another world size), the EMA,
    and per rank the RNG streams, the data position, the log window and the counters. Returns its step."""
    ckpt = trainer.ckpt
    meta = ckpt.read_meta(loaded_tag)
    step = int(meta["step"])
    tag_dir = ckpt.root / loaded_tag
    if meta["world_size"] != trainer.env.world_size:
        trainer.log(f"resuming {loaded_tag} saved at world size {meta['world_size']} on {trainer.env.world_size} "
                    f"ranks through a DeepSpeed universal checkpoint")
        load_universal(trainer, tag_dir, meta)
    else:
        for name, engine in trainer.engines.items():
            path, _ = engine.load_checkpoint(str(tag_dir), tag=name, load_optimizer_states=True,
                                             load_lr_scheduler_states=False, load_module_strict=True)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load engine '{name}' from {tag_dir / name}; "
                                   "refusing to start from scratch over an existing run")
    if trainer.ema is not None:
        trainer.ema.load(tag_dir / "ema", trainer.env.rank, trainer.env.world_size)
    if getattr(trainer, "posthoc", None) is not None:
        if trainer.posthoc.load(tag_dir, trainer.env.rank, trainer.env.world_size, trainer.log):
            trainer.posthoc.drop_after(step)      # snapshots the interrupted run wrote after this checkpoint
        else:
            trainer.posthoc = None
    old_hash = meta.get("config_hash")
    if old_hash and old_hash != config_hash(trainer.cfg):
        old, new = flatten(meta.get("config", {})), flatten(to_plain(trainer.cfg))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        trainer.log(f"note: config changed since {loaded_tag}: {', '.join(changed[:12])}")
    rank_state = ckpt.load_rank_state(loaded_tag) if meta["world_size"] == trainer.env.world_size else None
    if rank_state is not None:
        restore_rng(rank_state["rng"])
        data_state = json.loads(rank_state.get("data_json") or "{}")
        if data_state and hasattr(trainer.train_data, "load_state_dict"):
            trainer.train_data.load_state_dict(data_state)
        trainer.window = LogWindow(rank_state.get("window"))
        trainer.counters.update(rank_state.get("counters", {}))
    else:
        # Another world size (see launch/runtime/universal.py): RNG streams keyed by (seed, resume step, rank);
        # the loader is handed rank 0's old position, which it cannot continue at a new world size,
        # so it starts the epoch after that one (shard order is a function of seed, epoch, rank, worker).
        seed_everything(trainer.cfg.train.seed * 1_000_003 + step * 7919 + trainer.env.rank + 1)
        first = ckpt.root / loaded_tag / "state" / "rank_00000.pt"
        if first.is_file() and hasattr(trainer.train_data, "load_state_dict"):
            old_state = json.loads(torch.load(first, map_location="cpu", weights_only=True).get("data_json")
                                   or "{}")
            if old_state:
                trainer.train_data.load_state_dict(old_state)
        old_rank0 = torch.load(first, map_location="cpu", weights_only=True) if first.is_file() else {}
        trainer.counters.update(old_rank0.get("counters", {}))
    trainer.log(f"resumed from {loaded_tag} (step {step})")
    return step
