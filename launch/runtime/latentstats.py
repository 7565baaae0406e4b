"""Stage one's latent statistics at the end of a run (split out of train.py, which stays under 500 lines).

scaling_factor = 1/std and shift_factor = mean of the latents, measured on training batches with the weights
an export would use (EMA when on), stored in RUN_DIR/latent_stats.json and beside the final checkpoint (and
copied into exports). Collective: every rank calls it.
"""
from __future__ import annotations

import json
from typing import Iterable

import torch

from . import dist as D
from .checkpoint import tag_for


def _stats_batches(trainer) -> Iterable:
    """A fresh one-pass read of the training shards (not the training iterator, whose position is
    checkpointed), else held-out batches."""
    if trainer.stats_data is not None:
        yield from trainer.stats_data()
    elif trainer.val_data is not None:
        yield from trainer.val_data()


def write_latent_statistics(trainer, step: int) -> None:
    state = trainer.full_main_state(use_ema=True)   # collective under ZeRO-3
    if trainer.env.is_main and trainer.eval_module_factory is not None:
        module = trainer.eval_module_factory()
        module.load_state_dict(state, strict=False)
        module.to(trainer.env.device).eval()
        dev = trainer.env.device
        batches = ({k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in b.items()} for b in _stats_batches(trainer))
        with torch.random.fork_rng(devices=[]):
            stats = trainer.stage.latent_statistics(module, batches)
        text = json.dumps(stats, indent=1)
        (trainer.run_dir / "latent_stats.json").write_text(text)
        tag_dir = trainer.ckpt.root / tag_for(step)
        if tag_dir.is_dir():
            (tag_dir / "latent_stats.json").write_text(text)
        trainer.log(f"latent statistics: scaling_factor {stats['scaling_factor']:.5f}, "
                    f"shift_factor {stats['shift_factor']:.5f}")
    D.barrier()
