"""Classifier-free guidance at sampling time.

Batch layout (a plain function, so it exports to ONNX as is): the unconditional and the conditional
inputs are concatenated along the batch, uncond first,

    x2 = [x; x], t2 = [t; t], cond2 = [uncond; cond]   ->   one denoiser call   ->   pred2 = [u; c]

and combined as  g = u + w (c - u)  with w the guidance scale (w = 1: plain conditional model). Options:
- guidance interval [lo, hi] on the unit time u in [0, 1] (1 = noise end): outside it w is 1
  (Kynkaanniemi et al. 2024 apply guidance only in a middle range of noise levels);
- guidance rescale phi (Lin et al. 2023): g is rescaled per sample to the std of c, and
  phi * rescaled + (1 - phi) * g is returned. It is applied to the model's own prediction
  (eps, v or velocity), as in diffusers.
All choices are tensor ops (torch.where, no Python branching on values) to stay traceable.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch

from .conditioning import concat_conds

Denoiser = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


def cfg_batch(x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor],
              uncond: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(x, t, cond, uncond) -> (x2, t2, cond2) with the unconditional half first."""
    return torch.cat([x, x]), torch.cat([t, t]), concat_conds(uncond, cond)


def cfg_combine(pred2: torch.Tensor, scale: torch.Tensor | float, rescale: float = 0.0) -> torch.Tensor:
    """[u; c] -> u + scale (c - u), optionally rescaled (Lin et al.). `scale` is a float or a [B] tensor."""
    n = pred2.shape[0] // 2
    uncond, cond = pred2[:n], pred2[n:]   # slices, not chunk(): torch.export keeps the batch dynamic
    if not torch.is_tensor(scale):
        scale = torch.tensor(scale, dtype=cond.dtype, device=cond.device)
    scale = scale.to(cond.dtype).reshape(-1, *([1] * (cond.dim() - 1))) if scale.dim() else scale
    guided = uncond + scale * (cond - uncond)
    if rescale > 0:
        dims = tuple(range(1, cond.dim()))
        std_c = cond.std(dim=dims, keepdim=True)
        std_g = guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
        guided = rescale * guided * (std_c / std_g) + (1 - rescale) * guided
    return guided


def interval_scale(unit_t: torch.Tensor, scale: float, interval: Optional[tuple[float, float]]) -> torch.Tensor:
    """Per-sample scale: `scale` inside [lo, hi] of unit time, 1 outside (no guidance)."""
    full = torch.full_like(unit_t, float(scale))
    if interval is None:
        return full
    lo, hi = interval
    inside = (unit_t >= lo) & (unit_t <= hi)
    return torch.where(inside, full, torch.ones_like(full))


def guided(model: Denoiser, uncond: Mapping[str, torch.Tensor], scale: float, *,
           unit_time: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
           interval: Optional[tuple[float, float]] = None, rescale: float = 0.0) -> Denoiser:
    """Wrap `model(x, t, cond)` into a guided denoiser with the same signature (for the samplers).
    `unit_time` maps the sampler's native t to [0, 1] (objective.unit_time); needed for `interval`."""
    if interval is not None and unit_time is None:
        raise ValueError("a guidance interval needs unit_time (objective.unit_time)")

    def fn(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        x2, t2, cond2 = cfg_batch(x, t, cond, uncond)
        pred2 = model(x2, t2, cond2)
        w = scale if interval is None else interval_scale(unit_time(t).to(x.dtype), scale, interval)
        return cfg_combine(pred2, w, rescale)

    return fn
