"""What the runtime expects of a training stage.

A stage is plain PyTorch: it builds its modules and computes losses. The runtime (launch/)
owns distribution, engines, precision, accumulation, checkpoints, EMA and logging. Stages are
duck-typed against this protocol and never import `launch`.
"""
from __future__ import annotations

from typing import Mapping, Protocol

import torch
from torch import nn


class TrainingStage(Protocol):
    # Name of the module in `trainable_modules()` that EMA tracks, previews and export write.
    main_module: str

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules that get an optimizer (one DeepSpeed engine each), in the order they step."""

    def param_groups(self, name: str) -> list[dict]:
        """torch optimizer param groups for one trainable module; may set per-group "lr"
        (absolute) or "lr_scale" and "weight_decay"."""

    def setup(self, device: torch.device) -> None:
        """Move frozen helpers (text encoder, LPIPS, a frozen autoencoder) to `device`."""

    def training_step(self, nets: Mapping[str, nn.Module], batch: dict, step: int
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | float]]:
        """One micro-batch forward. `nets` wrap the trainable modules (DeepSpeed engines at run
        time): call those, not the raw modules. `step` counts optimizer steps of the main module.
        Returns (losses, logs): a scalar loss per module that steps this micro-step (a missing
        name does not step), and scalars to log."""

    @torch.no_grad()
    def validation_step(self, nets: Mapping[str, nn.Module], batch: dict, seed: int) -> dict[str, float]:
        """Held-out losses at fixed noise/timesteps drawn from `seed` (reproducible across runs)."""

    @torch.no_grad()
    def preview(self, main: nn.Module, batch: dict, seed: int) -> torch.Tensor:
        """Images in [-1, 1], [N, 3, H, W], for the run's PNG grid: samples from `main` (EMA weights)
        for the batch's captions (stage two) or reconstructions beside the inputs (stage one)."""
