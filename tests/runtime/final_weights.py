"""The end of every test training job: the main module's weights gathered in-process and written by rank 0,
for the bit-equality checks (resume vs uninterrupted, export vs run)."""
from __future__ import annotations

from pathlib import Path


def save_final_weights(trainer, run_dir, prefix: str = "final", *, ema: bool = True, write: bool = True) -> None:
    """Gather the live (and, when the run has one and `ema`, the EMA) weights: a collective under ZeRO-3, so
    every rank calls this; rank 0 then writes RUN_DIR/{prefix}_live.safetensors (+ {prefix}_ema) if `write`."""
    from safetensors.torch import save_file

    states = {"live": trainer.full_main_state(use_ema=False)}
    if ema and trainer.ema is not None:
        states["ema"] = trainer.full_main_state(use_ema=True)
    if write and trainer.env.is_main:
        for name, state in states.items():
            save_file({k: v.contiguous() for k, v in state.items()}, str(Path(run_dir) / f"{prefix}_{name}.safetensors"))
